"""Stage-2 feature cache: splitting models into trunk + tail, caching rules, equivalence with uncached training."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fgvc.data import ImageDataset, OnDeviceNormalize, build_loader
from fgvc.engine.feature_cache import (
    FeatureCache,
    cache_bytes_estimate,
    compute_cache,
    default_budget_bytes,
    should_cache,
    split_model,
    train_one_epoch_cached,
)
from fgvc.engine.loop import EpochStats, StopFlag, train_one_epoch
from fgvc.engine.runtime import Runtime
from fgvc.engine.sampling import EpochBatches, EpochSampler
from fgvc.errors import ConfigError
from fgvc.io import decode_image
from fgvc.models import ModelMeta, create_model, set_train_mode, set_trainable, trainable_parameters
from fgvc.transforms import build_transform

CPU = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
RES = 48  # stage-2 resolution of the equivalence runs
BATCH, GRAD_ACCUM = 5, 2
N_IMAGES, CORRUPT_ROW, NUM_CLASSES = 24, 7, 3


@pytest.fixture(autouse=True)
def frugal_and_deterministic() -> Iterator[None]:
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    modes = {m: m.training for m in model.modules()}
    with torch.no_grad():
        out = model.eval()(x)
    for m, training in modes.items():
        m.training = training
    return out


def split_output(split, x: torch.Tensor) -> torch.Tensor:
    net = split.trunk.model
    modes = {m: m.training for m in net.modules()}
    with torch.no_grad():
        net.eval()
        out = split.tail(split.trunk(x))
    for m, training in modes.items():
        m.training = training
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Splitting real architectures

# (arch, tune, example side, cut expected from the architecture, trunk output per image at that side or None)
SPLITS = [
    ("timm:test_resnet", "bn+fc", 64, "layer4.0", (192, 4, 4)),  # one block in layer4; its input: layer3, stride 16
    ("timm:test_resnet", "bnstats", 64, "layer4.0", (192, 4, 4)),
    ("timm:test_resnet", "fc", 64, "fc", (96,)),
    ("timm:resnet18", "bn+fc", 64, "layer4.1", (512, 2, 2)),  # last_bn layer4.1.bn2; layer4.0 output, stride 32
    ("timm:resnet18", "bnstats+fc", 64, "layer4.1", (512, 2, 2)),
    ("timm:resnet18", "stage+bn+fc", 64, "layer4.0", (256, 4, 4)),
    ("timm:resnet18", "fc", 64, "fc", (512,)),
    ("timm:test_efficientnet", "bn+fc", 64, "bn2", None),
    ("timm:test_efficientnet", "stage+bn+fc", 64, "blocks.4.0", None),
    ("timm:tf_efficientnet_lite0", "bn+fc", 64, "bn2", (1280, 2, 2)),  # conv_head output
    ("timm:tf_efficientnet_lite0", "stage+bn+fc", 64, "blocks.5.0", (112, 4, 4)),  # the stride-32 blocks from the first
    ("timm:tf_efficientnet_lite0", "fc", 64, "classifier", (1280,)),
    ("se_resnext101_32x4d", "bn+fc", 64, "layer4.2", (2048, 2, 2)),
    ("se_resnext101_32x4d", "fc", 64, "last_linear", (2048,)),
    ("senet154", "stage+bn+fc", 64, "layer4.0", (1024, 4, 4)),  # Table 10: SENet-154 "layer 4"
    ("inceptionresnetv2", "bn+fc", 96, "conv2d_7b", None),  # last_bn conv2d_7b.bn
]


@pytest.mark.parametrize(("arch", "tune", "side", "cut", "feature_shape"), SPLITS)
def test_split_reproduces_the_model(arch, tune, side, cut, feature_shape):
    torch.manual_seed(0)
    model = create_model(arch, 5)
    example = torch.randn(2, 3, side, side)
    split = split_model(model, tune, example)
    assert split is not None
    assert split.cut == cut
    if feature_shape is not None:
        assert split.feature_shape == feature_shape
        assert tuple(split.trunk(example).shape) == (2, *feature_shape)
    torch.testing.assert_close(split_output(split, example), eval_output(model, example), rtol=1e-5, atol=1e-6)
    # The tail is made of the model's own modules: everything the policy trains is in it, shared, not copied.
    tail_params = {id(p) for p in split.tail.parameters()}
    assert {id(p) for p in trainable_parameters(model, tune)} <= tail_params
    assert len(tail_params) < len(list(model.parameters()))


def test_split_leaves_train_modes_as_they_were():
    model = create_model("timm:resnet18", 5)
    set_train_mode(model, "stage+bn+fc")
    before = {name: m.training for name, m in model.named_modules()}
    assert split_model(model, "stage+bn+fc", torch.randn(2, 3, 64, 64)) is not None
    assert {name: m.training for name, m in model.named_modules()} == before


def toy_meta() -> ModelMeta:
    return ModelMeta(
        arch="toy",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        input_size=32,
        interpolation="bilinear",
        classifier="fc",
        last_bn="bn",
        last_stage=("bn",),
        num_classes=3,
    )


class ToyNet(nn.Module):
    """stem -> bn -> pool -> fc, with the forward variants a chain split must accept or refuse."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)
        self.gain = nn.Linear(1, 1, bias=False)  # "functional": its weight is read directly, never called
        self.fgvc_meta = toy_meta()
        with torch.no_grad():  # non-trivial statistics, so that every variant gives a different output
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        if self.variant == "chain":
            y = self.bn(y)
        elif self.variant == "functional":
            return self.fc(self.pool(self.bn(y)).view(len(y), -1)) * self.gain.weight.view(())
        elif self.variant == "skip":  # a residual connection across the cut
            y = self.bn(y) + y
        elif self.variant == "twice":
            y = self.bn(self.bn(y))
        return self.fc(self.pool(y).view(len(y), -1))


def test_a_plain_chain_without_head_api_splits_with_a_flatten_before_the_linear():
    torch.manual_seed(0)
    model = ToyNet("chain")
    x = torch.randn(2, 3, 16, 16)
    split = split_model(model, "bn+fc", x)
    assert split is not None and split.cut == "bn"
    assert [type(block) for block in split.tail.blocks] == [nn.BatchNorm2d, nn.AdaptiveAvgPool2d, nn.Linear]
    torch.testing.assert_close(split_output(split, x), eval_output(model, x))
    fc_only = split_model(model, "fc", x)
    assert fc_only is not None and fc_only.cut == "fc" and fc_only.feature_shape == (8,)


@pytest.mark.parametrize(
    ("variant", "tune", "why"),
    [("skip", "bn+fc", "not a chain"), ("twice", "bn+fc", "more than once"), ("chain", "all", "whole network")],
)
def test_models_that_are_not_a_chain_are_refused_with_a_reason(variant, tune, why, fgvc_log):
    torch.manual_seed(0)
    assert split_model(ToyNet(variant), tune, torch.randn(2, 3, 16, 16)) is None
    assert any(why in record.getMessage() for record in fgvc_log.records)


def test_a_tuned_module_used_outside_the_blocks_is_refused(fgvc_log):
    model = ToyNet("functional")
    model.fgvc_meta = ModelMeta(**{**toy_meta().__dict__, "classifier": "gain"})  # bn+fc tunes bn and gain
    assert split_model(model, "bn+fc", torch.randn(2, 3, 16, 16)) is None
    assert any("gain" in record.getMessage() for record in fgvc_log.records)


# ---------------------------------------------------------------------------------------------------------------------
# Size estimate and the caching rules


def test_cache_bytes_estimate_matches_a_hand_computation():
    model = create_model("timm:resnet18", 5)
    stage = split_model(model, "stage+bn+fc", torch.randn(1, 3, 64, 64))  # cut: layer4 input, 256 ch at stride 16
    assert cache_bytes_estimate(stage, 100, 224, torch.float32) == 100 * 256 * 14 * 14 * 4
    assert cache_bytes_estimate(stage, 100, 448, torch.bfloat16) == 100 * 256 * 28 * 28 * 2
    # 100 px: conv1 (s2) 50, maxpool 25, layer2 13, layer3 7 (each stride-2 layer rounds up).
    assert cache_bytes_estimate(stage, 10, 100, torch.float32) == 10 * 256 * 7 * 7 * 4
    assert tuple(stage.trunk(torch.randn(1, 3, 100, 100)).shape) == (1, 256, 7, 7)
    pooled = split_model(model, "fc", torch.randn(1, 3, 64, 64))
    assert cache_bytes_estimate(pooled, 100, 640, torch.float16) == 100 * 512 * 2  # pooled: independent of res


def test_default_budget_is_a_quarter_of_available_ram_at_most():
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < default_budget_bytes("cpu") <= total // 4


@pytest.mark.parametrize(
    ("mode", "augment", "tune", "estimate", "budget", "world", "expected"),
    [
        ("auto", "test", "bn+fc", 10, 100, 1, True),
        ("auto", "test", "stage+bn+fc", 100, 100, 1, True),
        ("auto", "test", "bn+fc", 101, 100, 1, False),  # does not fit
        ("on", "test", "bn+fc", 10**12, 100, 1, True),  # forced: the budget is ignored
        ("off", "test", "bn+fc", 10, 100, 1, False),
        ("auto", "test2", "bn+fc", 10, 100, 1, False),  # random augmentation
        ("auto", "train", "fc", 10, 100, 1, False),
        ("auto", "test", "all", 10, 100, 1, False),  # nothing frozen
        ("auto", "test", "bnstats", 10, 100, 2, False),  # several processes
        ("off", "train", "all", 10, 100, 4, False),  # off never complains
    ],
)
def test_should_cache_rules(mode, augment, tune, estimate, budget, world, expected):
    use, reason = should_cache(mode, augment, tune, estimate, budget, world_size=world)
    assert use is expected
    assert reason and "\n" not in reason


@pytest.mark.parametrize(
    ("augment", "tune", "world", "why"),
    [("test2", "bn+fc", 1, "random"), ("train", "bn+fc", 1, "random"), ("test", "all", 1, "whole network"),
     ("test", "fc", 2, "single-process")],
)  # fmt: skip
def test_forcing_the_cache_where_it_would_be_wrong_is_a_config_error(augment, tune, world, why):
    with pytest.raises(ConfigError, match=why) as err:
        should_cache("on", augment, tune, 10, 100, world_size=world)
    assert "\n" not in str(err.value)


def test_unknown_cache_mode_names_the_options():
    with pytest.raises(ConfigError, match="auto, on, off"):
        should_cache("always", "test", "bn+fc", 10, 100)


# ---------------------------------------------------------------------------------------------------------------------
# The cache and training from it


@pytest.fixture
def image_frame(tmp_path: Path) -> pd.DataFrame:
    """24 random-texture JPEGs of varied sizes (labels i % 3); row 7 is a truncated, unreadable file."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_IMAGES):
        path = tmp_path / f"img_{i}.jpg"
        height, width = int(rng.integers(50, 70)), int(rng.integers(50, 70))
        image = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (5, 5), 0)
        assert cv2.imwrite(str(path), image)
        paths.append(str(path))
    data = Path(paths[CORRUPT_ROW]).read_bytes()
    Path(paths[CORRUPT_ROW]).write_bytes(data[: len(data) // 3])
    return pd.DataFrame({"path": paths, "label": [i % NUM_CLASSES for i in range(N_IMAGES)]})


def test_loader_batches_are_composed_like_the_image_loader(image_frame):
    dataset = ImageDataset(image_frame, build_transform("test", 16, interpolation="bilinear"), skip_corrupt=True)
    cache = FeatureCache(
        features=torch.arange(N_IMAGES, dtype=torch.float32).view(-1, 1),
        labels=torch.tensor(image_frame["label"].to_numpy()),
        present=torch.tensor([row != CORRUPT_ROW for row in range(N_IMAGES)]),
    )
    for drop_last in (True, False):
        sampler = EpochSampler(N_IMAGES, shuffle=True, seed=3)  # batched as make_loader batches a training loader
        loader = build_loader(dataset, batch_size=BATCH, batch_sampler=EpochBatches(sampler, BATCH, drop_last))
        sampler.set_epoch(1, start=BATCH)  # a resumed epoch: the first batch was already consumed
        expected = [(rows.tolist(), labels.tolist()) for _images, labels, rows in loader]
        batches = cache.batches(sampler, BATCH, drop_last)
        got = [(rows.tolist(), labels.tolist()) for _features, labels, rows in batches]
        assert got == expected and len(batches) == len(loader)
        assert all(f.view(-1).tolist() == rows.tolist() for f, _labels, rows in batches)


def test_compute_cache_stores_the_trunk_output_by_dataset_row(image_frame):
    torch.manual_seed(0)
    model = create_model("timm:test_resnet", NUM_CLASSES)
    meta = model.fgvc_meta
    transform = build_transform("test", RES, interpolation=meta.interpolation)
    dataset = ImageDataset(image_frame, transform, skip_corrupt=True)
    loader = build_loader(dataset, batch_size=7, sampler=EpochSampler(N_IMAGES, shuffle=False))
    prepare = OnDeviceNormalize(meta.mean, meta.std, "cpu", channels_last=False)
    set_train_mode(model, "stage+bn+fc")
    modes = {name: m.training for name, m in model.named_modules()}
    split = split_model(model, "stage+bn+fc", torch.randn(2, 3, RES, RES))
    cache = compute_cache(split.trunk, loader, prepare, CPU, progress=False)

    assert {name: m.training for name, m in model.named_modules()} == modes
    good = [row for row in range(N_IMAGES) if row != CORRUPT_ROW]
    assert cache.present.tolist() == [row != CORRUPT_ROW for row in range(N_IMAGES)]
    assert cache.labels[good].tolist() == [row % NUM_CLASSES for row in good]
    images = torch.stack([transform(decode_image(image_frame["path"][row])) for row in good])
    with torch.no_grad():  # the input of layer4, written out by hand
        model.eval()
        x = model.maxpool(model.act1(model.bn1(model.conv1(prepare(images)))))
        expected = model.layer3(model.layer2(model.layer1(x)))
    torch.testing.assert_close(cache.features[good], expected, rtol=1e-5, atol=1e-6)
    assert cache.features.dtype == torch.float32 and cache.nbytes == N_IMAGES * 192 * 3 * 3 * 4


@pytest.mark.parametrize(("arch", "tune", "stored"), [("timm:test_resnet", "stage+bn+fc", torch.bfloat16),
                                                     ("timm:test_vit", "fc", torch.float32),
                                                     ("timm:test_convnext", "stage+bn+fc", torch.float32)])  # fmt: skip
def test_under_amp_the_cache_keeps_the_trunk_outputs_own_dtype(image_frame, arch, tune, stored):
    """A CNN's cut input comes out of bf16 convolutions; a ViT's or ConvNeXt's is a float32 stream (LayerNorm'd or
    residual) even under autocast: rounding it to bf16 would make the cached path differ from the uncached one."""
    torch.manual_seed(0)
    model = create_model(arch, NUM_CLASSES)
    meta = model.fgvc_meta
    bf16 = Runtime(device=torch.device("cpu"), amp_dtype=torch.bfloat16, channels_last=False)
    split = split_model(model, tune, torch.randn(2, 3, 64, 64), bf16.autocast)
    assert split is not None and split.feature_dtype == stored
    transform = build_transform("test", 64, interpolation=meta.interpolation)
    loader = build_loader(ImageDataset(image_frame.iloc[:4], transform), batch_size=2,
                          sampler=EpochSampler(4, shuffle=False))  # fmt: skip
    prepare = OnDeviceNormalize(meta.mean, meta.std, "cpu", channels_last=False)
    cache = compute_cache(split.trunk, loader, prepare, bf16, progress=False)
    images = torch.stack([transform(decode_image(path)) for path in image_frame["path"][:4]])
    model.eval()  # as compute_cache runs the trunk
    with torch.no_grad(), bf16.autocast():
        expected = split.trunk(prepare(images))
    assert cache.features.dtype == stored
    torch.testing.assert_close(cache.features, expected, rtol=0, atol=0)
    assert cache.nbytes == cache_bytes_estimate(split, 4, 64, split.feature_dtype)


def _run(
    model: nn.Module,
    tune: str,
    frame: pd.DataFrame,
    epochs: int,
    cached_from: int | None,
    stop: StopFlag | None = None,
) -> list[EpochStats]:
    """Stage-2-like training (test transform, seeded shuffled sampler, drop_last, grad accumulation, SGD + schedule);
    epochs from ``cached_from`` on run through the cache, the others through the model."""
    meta = model.fgvc_meta
    transform = build_transform("test", RES, interpolation=meta.interpolation)
    dataset = ImageDataset(frame, transform, skip_corrupt=True)
    sampler = EpochSampler(len(dataset), shuffle=True, seed=11)
    loader = build_loader(dataset, batch_size=BATCH, sampler=sampler, drop_last=True)
    prepare = OnDeviceNormalize(meta.mean, meta.std, "cpu", channels_last=False)
    params = set_trainable(model, tune)
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4) if params else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step)) if optimizer else None
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    split, cache, history = None, None, []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        set_train_mode(model, tune)
        if cached_from is not None and epoch >= cached_from:
            if cache is None:
                split = split_model(model, tune, torch.randn(2, 3, RES, RES))
                cache_loader = build_loader(dataset, batch_size=7, sampler=EpochSampler(len(dataset), shuffle=False))
                cache = compute_cache(split.trunk, cache_loader, prepare, CPU, progress=False)
            stats = train_one_epoch_cached(split.tail, cache, sampler, BATCH, True, optimizer, scheduler, None, CPU,
                                           criterion, grad_accum=GRAD_ACCUM, stop=stop, progress=False)  # fmt: skip
        else:
            stats = train_one_epoch(model, loader, optimizer, scheduler, None, CPU, prepare, criterion,
                                    grad_accum=GRAD_ACCUM, stop=stop, batch_size=BATCH, progress=False)  # fmt: skip
        history.append(stats)
    return history


@pytest.mark.parametrize("tune", ["bn+fc", "stage+bn+fc", "fc", "bnstats"])
def test_cached_training_matches_uncached_training(image_frame, tune):
    torch.manual_seed(0)
    initial = create_model("timm:test_resnet", NUM_CLASSES)
    runs = {}
    for name, cached_from in (("uncached", None), ("cached from epoch 2", 1), ("cached from the start", 0)):
        model = copy.deepcopy(initial)
        runs[name] = (model, _run(model, tune, image_frame, epochs=2, cached_from=cached_from))

    reference_model, reference_history = runs.pop("uncached")
    reference = reference_model.state_dict()
    start = initial.state_dict()
    tuned = [k for k in reference if not torch.equal(reference[k], start[k])]
    assert tuned, "training changed nothing: the comparison would be vacuous"
    assert any("running_mean" in k for k in tuned) == (tune != "fc")
    assert any(k.startswith(initial.fgvc_meta.classifier) for k in tuned) == (tune != "bnstats")
    for name, (model, history) in runs.items():
        state = model.state_dict()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
        for got, expected in zip(history, reference_history, strict=True):
            assert (got.images, got.skipped, got.micro_steps, got.interrupted) == (
                expected.images, expected.skipped, expected.micro_steps, expected.interrupted,
            )  # fmt: skip
            assert got.loss == pytest.approx(expected.loss, rel=1e-5)
            assert got.lr == pytest.approx(expected.lr)


@pytest.mark.parametrize("tune", ["bn+fc", "stage+bn+fc"])
def test_uncached_stage2_records_autograd_only_from_the_cut_on(tune):
    """Why stage 2 without the cache needs no ``no_grad`` wrapper: with the trunk's parameters frozen and images that
    need no gradient, autograd records nothing before the first tuned module, so the trunk costs what inference does.
    """
    torch.manual_seed(0)
    model = create_model("timm:test_resnet", NUM_CLASSES)
    set_trainable(model, tune)
    set_train_mode(model, tune)
    split = split_model(model, tune, torch.randn(2, 3, RES, RES))
    recorded: dict[str, bool] = {}
    for name, module in model.named_children():
        module.register_forward_hook(lambda _m, _a, out, name=name: recorded.__setitem__(name, out.grad_fn is not None))
    model(torch.randn(3, 3, RES, RES)).sum().backward()
    cut_child = split.cut.split(".")[0]  # the top-level module that holds the cut
    names = list(recorded)
    assert names.index(cut_child) > 0, "the cut must leave a trunk in front of it"
    assert not any(recorded[name] for name in names[: names.index(cut_child)]), recorded
    assert all(recorded[name] for name in names[names.index(cut_child) :]), recorded


def test_a_stop_request_ends_the_cached_epoch_at_the_same_step(image_frame):
    torch.manual_seed(0)
    initial = create_model("timm:test_resnet", NUM_CLASSES)
    stop = StopFlag()
    stop.signum = 15
    uncached, cached = copy.deepcopy(initial), copy.deepcopy(initial)
    [expected] = _run(uncached, "bn+fc", image_frame, epochs=1, cached_from=None, stop=stop)
    [got] = _run(cached, "bn+fc", image_frame, epochs=1, cached_from=0, stop=stop)
    assert expected.interrupted and got.interrupted
    assert got.micro_steps == expected.micro_steps == GRAD_ACCUM
    torch.testing.assert_close(cached.fc.weight, uncached.fc.weight, rtol=1e-4, atol=1e-5)


def test_cached_training_refuses_several_processes():
    cache = FeatureCache(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.bool))
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False, world_size=2)
    with pytest.raises(ValueError, match="single-process"):
        train_one_epoch_cached(nn.Linear(4, 2), cache, [0, 1], 2, False, None, None, None, rt, nn.CrossEntropyLoss())
