"""Decoding: every oddity of real fine-grained datasets gives an upright RGB uint8 array or a one-line error."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from fgvc import io as fgvc_io
from fgvc.errors import CorruptImageError, DataError
from fgvc.io import decode_image

JPEG_TOLERANCE = 8  # max abs error inside a flat 16x16-aligned block at quality 95
RED, GREEN, BLUE, WHITE = (220, 20, 30), (20, 200, 40), (30, 40, 210), (255, 255, 255)


def stripes(colors: list[tuple[int, int, int]], block: int = 16, width: int = 48) -> np.ndarray:
    """Horizontal bands of flat colour, each ``block`` rows high (aligned to JPEG's 16x16 MCUs)."""
    return np.concatenate([np.full((block, width, 3), c, dtype=np.uint8) for c in colors])


def band_centres(image: np.ndarray, count: int, block: int = 16) -> np.ndarray:
    """The centre pixel of each band, as int so differences do not wrap."""
    width = image.shape[1]
    return np.array([image[i * block + block // 2, width // 2] for i in range(count)], dtype=int)


def assert_valid(image: np.ndarray, shape: tuple[int, int]) -> None:
    assert image.dtype == np.uint8
    assert image.shape == (*shape, 3)
    assert image.flags["C_CONTIGUOUS"]


def write_jpeg(path: Path, array: np.ndarray, **options) -> Path:
    Image.fromarray(array).save(path, "JPEG", quality=95, **options)
    return path


def test_rgb_jpeg_colours(tmp_path: Path) -> None:
    colors = [RED, GREEN, BLUE]
    path = write_jpeg(tmp_path / "a.jpg", stripes(colors))
    image = decode_image(path)
    assert_valid(image, (48, 48))
    assert np.abs(band_centres(image, 3) - np.array(colors)).max() <= JPEG_TOLERANCE


def test_png_named_jpg_is_exact(tmp_path: Path) -> None:
    array = stripes([RED, GREEN, BLUE])
    array[0, 0] = (1, 2, 3)  # a lone pixel: lossless formats must keep it
    path = tmp_path / "png_inside.jpg"
    Image.fromarray(array).save(path, "PNG")
    image = decode_image(path)
    assert_valid(image, (48, 48))
    np.testing.assert_array_equal(image, array)


def test_gif_named_jpg_is_exact(tmp_path: Path) -> None:
    array = stripes([RED, GREEN, BLUE, WHITE])
    path = tmp_path / "gif_inside.jpg"
    Image.fromarray(array).save(path, "GIF")
    np.testing.assert_array_equal(decode_image(path), array)


def test_pillow_fallback_when_opencv_cannot_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GIF goes through Pillow on OpenCV builds without a GIF decoder; simulate one."""
    array = stripes([RED, GREEN, BLUE, WHITE])
    path = tmp_path / "gif_inside.jpg"
    Image.fromarray(array).save(path, "GIF")
    monkeypatch.setattr(fgvc_io.cv2, "imdecode", lambda *args: None)
    image = decode_image(path)
    assert_valid(image, (64, 48))
    np.testing.assert_array_equal(image, array)


def test_format_opencv_lacks_goes_through_pillow(tmp_path: Path) -> None:
    """OpenCV has no ICO decoder; Pillow reads it."""
    array = stripes([RED, GREEN], width=32)
    path = tmp_path / "icon.jpg"
    Image.fromarray(array).save(path, "ICO", sizes=[(32, 32)])
    raw = np.fromfile(path, dtype=np.uint8)
    assert cv2.imdecode(raw, cv2.IMREAD_COLOR) is None  # precondition: this really is the fallback path
    image = decode_image(path)
    assert_valid(image, (32, 32))
    np.testing.assert_array_equal(image, array)


def test_grayscale_jpeg_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = np.concatenate([np.full((16, 32), 30, np.uint8), np.full((16, 32), 200, np.uint8)])
    path = tmp_path / "gray.jpg"
    Image.fromarray(gray, mode="L").save(path, "JPEG", quality=95)
    image = decode_image(path)
    assert_valid(image, (32, 32))
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    assert abs(int(image[8, 16, 0]) - 30) <= JPEG_TOLERANCE
    assert abs(int(image[24, 16, 0]) - 200) <= JPEG_TOLERANCE


def test_cmyk_jpeg_gives_rgb(tmp_path: Path) -> None:
    """Pure inks with no black: R = 255 - C, G = 255 - M, B = 255 - Y under any CMYK->RGB convention."""
    inks = [(0, 255, 255, 0), (255, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 255)]
    expected = [(255, 0, 0), (0, 255, 255), (255, 255, 255), (0, 0, 0)]
    cmyk = Image.new("CMYK", (32, 64))
    for i, ink in enumerate(inks):
        cmyk.paste(ink, (0, 16 * i, 32, 16 * (i + 1)))
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, "JPEG", quality=95)
    image = decode_image(path)
    assert_valid(image, (64, 32))
    assert np.abs(band_centres(image, 4) - np.array(expected)).max() <= JPEG_TOLERANCE


@pytest.mark.parametrize(
    ("orientation", "marker_corner"),
    [(6, "top_right"), (8, "bottom_left")],  # 6: rotate 90 deg clockwise to view; 8: counter-clockwise
)
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, marker_corner: str) -> None:
    stored = np.zeros((32, 64, 3), np.uint8)  # landscape as stored, a white marker in the stored top-left
    stored[:16, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = write_jpeg(tmp_path / "rotated.jpg", stored, exif=exif.tobytes())
    image = decode_image(path)
    assert_valid(image, (64, 32))  # portrait once upright
    corners = {
        "top_left": image[8, 8],
        "top_right": image[8, -8],
        "bottom_left": image[-8, 8],
        "bottom_right": image[-8, -8],
    }
    for name, pixel in corners.items():
        expected = 255 if name == marker_corner else 0
        assert np.abs(pixel.astype(int) - expected).max() <= JPEG_TOLERANCE, name


def test_exif_orientation_is_applied_by_the_pillow_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:16, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = write_jpeg(tmp_path / "rotated.jpg", stored, exif=exif.tobytes())
    monkeypatch.setattr(fgvc_io.cv2, "imdecode", lambda *args: None)
    image = decode_image(path)
    assert_valid(image, (64, 32))
    assert np.abs(image[8, -8].astype(int) - 255).max() <= JPEG_TOLERANCE  # stored top-left is now top-right
    assert np.abs(image[8, 8].astype(int)).max() <= JPEG_TOLERANCE


def test_rgba_png_drops_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = GREEN
    rgba[..., 3] = 0
    rgba[:8, :, 3] = 128
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    image = decode_image(path)
    assert_valid(image, (16, 16))
    np.testing.assert_array_equal(image, np.broadcast_to(np.array(GREEN, np.uint8), (16, 16, 3)))


def test_16bit_png_becomes_8bit(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 0xAB40, np.uint16)).save(path)
    image = decode_image(path)
    assert_valid(image, (8, 8))
    assert np.abs(image.astype(int) - 0xAB).max() <= 1  # the high byte, however the 8-bit value is rounded


def test_trailing_bytes_after_complete_jpeg_are_harmless(tmp_path: Path) -> None:
    clean = write_jpeg(tmp_path / "clean.jpg", stripes([RED, BLUE]))
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(clean.read_bytes() + b"camera maker notes" * 4)
    np.testing.assert_array_equal(decode_image(padded), decode_image(clean))


def test_bytes_after_the_end_marker_need_no_second_opinion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow refuses images over its decompression-bomb limit (179 Mpx) and reads zeros as pixels; neither may make a
    complete photo with a trailer (then padding) corrupt."""
    clean = write_jpeg(tmp_path / "clean.jpg", stripes([RED, BLUE]))
    trailer = tmp_path / "trailer.jpg"
    trailer.write_bytes(clean.read_bytes() + b"EXIFTRAILER" + b"\0" * 64)
    monkeypatch.setattr(fgvc_io, "_decode_with_pillow", lambda data: None)
    np.testing.assert_array_equal(decode_image(trailer), decode_image(clean))


def truncated_jpeg(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    full = write_jpeg(tmp_path / "full.jpg", rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    data = full.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    return cut


def test_truncated_jpeg_is_corrupt(tmp_path: Path) -> None:
    cut = truncated_jpeg(tmp_path)
    with pytest.raises(CorruptImageError, match=re.escape(str(cut))) as info:
        decode_image(cut)
    message = str(info.value)
    assert "\n" not in message
    assert "--skip-corrupt" in message


def test_truncated_jpeg_is_corrupt_even_if_opencv_returns_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Older OpenCV builds fill the missing half with grey and only warn; the policy must not depend on that."""
    cut = truncated_jpeg(tmp_path)
    monkeypatch.setattr(fgvc_io.cv2, "imdecode", lambda *args: np.full((64, 96, 3), 128, np.uint8))
    with pytest.raises(CorruptImageError, match=re.escape(str(cut))):
        decode_image(cut)


def test_a_cut_off_jpeg_padded_with_zeros_to_its_full_size_is_corrupt(tmp_path: Path) -> None:
    """Downloaders that allocate the whole file first (aria2, torrent clients) leave zeros where the tail never came;
    Pillow decodes those zeros as image data, so the file must not be judged by whether Pillow reads it."""
    cut = truncated_jpeg(tmp_path)
    full_size = (tmp_path / "full.jpg").stat().st_size
    padded = tmp_path / "preallocated.jpg"
    padded.write_bytes(cut.read_bytes().ljust(full_size, b"\0"))
    with pytest.raises(CorruptImageError, match=re.escape(str(padded))):
        decode_image(padded)
    complete = tmp_path / "complete-then-zeros.jpg"  # zeros after the end marker are still harmless
    complete.write_bytes((tmp_path / "full.jpg").read_bytes() + b"\0" * 64)
    np.testing.assert_array_equal(decode_image(complete), decode_image(tmp_path / "full.jpg"))


@pytest.mark.parametrize("content", [b"this is not an image\n", b""], ids=["text", "empty"])
def test_non_image_is_corrupt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.jpg"
    path.write_bytes(content)
    with pytest.raises(CorruptImageError, match=re.escape(str(path))):
        decode_image(path)


def test_missing_file_is_data_error(tmp_path: Path) -> None:
    missing = tmp_path / "gone.jpg"
    with pytest.raises(DataError, match=re.escape(str(missing))) as info:
        decode_image(missing)
    assert not isinstance(info.value, CorruptImageError)


def test_directory_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path.name)):
        decode_image(tmp_path)


def test_typical_source_pixels_is_the_median_stored_size_read_from_headers(tmp_path: Path) -> None:
    sizes = [(40, 30), (80, 60), (80, 60), (160, 120)]  # (width, height)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = tmp_path / f"{i}.jpg"
        cv2.imwrite(str(path), np.zeros((h, w, 3), np.uint8))
        paths.append(str(path))
    paths.append(str(tmp_path / "missing.jpg"))  # ignored, as is a file that is not an image
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    paths.append(str(tmp_path / "junk.jpg"))
    assert fgvc_io.typical_source_pixels(np.array(paths, dtype=object)) == 80 * 60
    assert fgvc_io.typical_source_pixels(paths[:1] * 100, samples=3) == 40 * 30
    assert fgvc_io.typical_source_pixels(paths[-2:]) is None
    assert fgvc_io.typical_source_pixels([]) is None


def test_a_corrupt_file_is_reported_once_by_fgvc_not_by_opencvs_logger(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    gif = tmp_path / "cut.gif"
    Image.fromarray(stripes([RED, BLUE])).save(gif)
    gif.write_bytes(gif.read_bytes()[:20])
    with pytest.raises(CorruptImageError, match=re.escape(str(gif))):
        decode_image(gif)
    assert "imdecode" not in capfd.readouterr().err
