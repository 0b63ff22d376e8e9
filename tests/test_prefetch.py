"""The background-thread batch preparer used with ``decode: gpu``: same batches, same errors, clean early exits."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fgvc.errors import CorruptImageError
from fgvc.prefetch import Prefetcher, wait_prepared


def loader(n: int = 10, batch: int = 3) -> DataLoader:
    data = TensorDataset(torch.arange(n * 4, dtype=torch.float32).view(n, 4), torch.arange(n), torch.arange(n) + 100)
    return DataLoader(data, batch_size=batch, drop_last=False)


def double(images: torch.Tensor) -> torch.Tensor:
    return images * 2


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fgvc-prefetch"]


def test_batches_arrive_in_order_prepared_with_their_labels() -> None:
    plain = loader()
    prefetched = Prefetcher(plain, double, torch.device("cpu"))
    assert len(prefetched) == len(plain) == 4
    assert prefetched.drop_last is False and prefetched.dataset is plain.dataset  # the loader's attributes pass through
    for _epoch in range(2):  # iterable again, like the loader it wraps
        got = [(wait_prepared(x), y, rows) for x, y, rows in prefetched]
        expected = [(double(x), y, rows) for x, y, rows in plain]
        assert len(got) == len(expected)
        for (gx, gy, grows), (ex, ey, erows) in zip(got, expected, strict=True):
            assert torch.equal(gx, ex) and torch.equal(gy, ey) and torch.equal(grows, erows)
    assert not prefetch_threads()


def test_an_error_while_preparing_is_raised_in_the_loop_unchanged() -> None:
    calls = []

    def fails_on_second(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        if len(calls) == 2:
            raise CorruptImageError("datasets/x/broken.jpg: not an image; delete it or pass --skip-corrupt")
        return images

    seen = []
    with pytest.raises(CorruptImageError, match=r"broken\.jpg"):
        for x, _y, _rows in Prefetcher(loader(), fails_on_second, torch.device("cpu")):
            seen.append(wait_prepared(x))
    assert len(seen) == 1
    assert not prefetch_threads()


def test_leaving_an_epoch_early_ends_the_thread() -> None:
    prepared = []

    def counting(images: torch.Tensor) -> torch.Tensor:
        prepared.append(1)
        return images

    iterator = iter(Prefetcher(loader(n=60, batch=2), counting, torch.device("cpu"), depth=2))
    next(iterator)
    iterator.close()  # what a `return` out of the loop's for does
    assert not prefetch_threads()
    assert len(prepared) < 30  # it stopped: the thread ran at most a queue's depth ahead, not through the epoch


NO_CUDA = "needs CUDA: the side stream and nvJPEG (benchmarks/run_on_gpu.sh runs it on the GPU machine)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_on_cuda_prefetched_device_batches_equal_the_direct_ones(tmp_path) -> None:
    """The thread decodes on its own stream while the main stream is busy; the loop must still see finished batches."""
    import cv2
    import numpy as np
    import pandas as pd

    from fgvc.gpu_decode import EncodedImageDataset, GpuBatchPreparer, collate_encoded

    rng = np.random.default_rng(0)
    paths = []
    for i in range(24):
        h, w = rng.integers(300, 700, size=2)
        image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 3)
        paths.append(str(tmp_path / f"{i}.jpg"))
        cv2.imwrite(paths[-1], image)
    frame = pd.DataFrame({"path": paths, "label": [i % 3 for i in range(24)]})
    dataset = EncodedImageDataset(frame)
    keys = [(row, 1000 + row) for row in range(24)]
    plain = DataLoader(dataset, batch_size=8, sampler=keys, collate_fn=collate_encoded, num_workers=2)
    device = torch.device("cuda")
    prepare = GpuBatchPreparer("train", 160, (0.5,) * 3, (0.25,) * 3, device)
    expected = [prepare(images).cpu() for images, _y, _rows in plain]
    busy = torch.randn(4096, 4096, device=device)
    got = []
    for x, _y, _rows in Prefetcher(plain, prepare, device):
        for _ in range(20):  # keep the main stream busy, so an unordered read would see unfinished pixels
            busy = busy @ busy / 64
        got.append(wait_prepared(x).clone().cpu())
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-4)
