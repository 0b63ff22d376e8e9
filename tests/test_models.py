"""Model registry: metadata, any-resolution forward passes, wrappers, errors and `models list`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fgvc.errors import ConfigError
from fgvc.models import (
    REGISTRY,
    ModelMeta,
    create_model,
    get_meta,
    last_batchnorm,
    list_models,
    model_meta,
    trainable_parameters,
)
from fgvc.models.registry import model_spec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# Hand-written from the papers, the pretrainedmodels settings table and /work/shared/notes/method.md.
EXPECTED_META = {
    "senet154": (IMAGENET_MEAN, IMAGENET_STD, 224, "last_linear", "layer4.2.bn3", ("layer4",)),
    "se_resnext101_32x4d": (IMAGENET_MEAN, IMAGENET_STD, 224, "last_linear", "layer4.2.bn3", ("layer4",)),
    "inceptionresnetv2": (HALF, HALF, 299, "last_linear", "conv2d_7b.bn", ("repeat_2", "block8", "conv2d_7b")),
    "pnasnet5large": (
        HALF,
        HALF,
        331,
        "last_linear",
        "cell_11.comb_iter_4_left.bn_sep_2",
        ("cell_9", "cell_10", "cell_11"),
    ),
    "resnet50": (IMAGENET_MEAN, IMAGENET_STD, 224, "fc", "layer4.2.bn3", ("layer4",)),
    "resnet152": (IMAGENET_MEAN, IMAGENET_STD, 224, "fc", "layer4.2.bn3", ("layer4",)),
    "resnext101_32x48d_wsl": (IMAGENET_MEAN, IMAGENET_STD, 224, "fc", "layer4.2.bn3", ("layer4",)),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # single-threaded torch: see conftest.py


def build_on_meta(name: str, num_classes: int) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, num_classes, None)


def test_registry_holds_the_paper_architectures():
    assert set(REGISTRY) == set(EXPECTED_META)


@pytest.mark.parametrize("name", sorted(EXPECTED_META))
def test_registry_meta_matches_the_sources_and_names_real_modules(name):
    mean, std, size, classifier, last_bn, last_stage = EXPECTED_META[name]
    meta = model_meta(name, num_classes=7)
    assert (meta.arch, meta.mean, meta.std, meta.input_size) == (name, mean, std, size)
    assert (meta.classifier, meta.last_bn, meta.last_stage, meta.num_classes) == (classifier, last_bn, last_stage, 7)
    model = build_on_meta(name, 7)
    modules = dict(model.named_modules())
    assert isinstance(modules[classifier], nn.Linear) and modules[classifier].out_features == 7
    assert isinstance(modules[last_bn], nn.BatchNorm2d)
    assert all(stage in modules for stage in last_stage)
    assert get_meta(model) == meta


@pytest.mark.parametrize("name", sorted(EXPECTED_META))
def test_registry_last_bn_is_the_last_batchnorm_in_forward_order(name):
    model = build_on_meta(name, 10)
    assert last_batchnorm(model, model_meta(name).input_size) == model_meta(name).last_bn


def test_last_batchnorm_follows_forward_order_not_registration_order():
    class Swapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.BatchNorm2d(3)  # registered first, runs last
            self.early = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.late(self.early(x))

    model = Swapped().train()
    assert last_batchnorm(model, 8) == "late"
    assert model.training and model.late.training  # the probe restores train/eval flags
    assert last_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1)), 8) is None


def test_timm_models_take_meta_from_timm_and_find_head_and_last_bn():
    lite = model_meta("timm:tf_efficientnet_lite0")
    assert lite == ModelMeta(
        arch="timm:tf_efficientnet_lite0",
        mean=HALF,
        std=HALF,
        input_size=224,
        interpolation="bicubic",
        classifier="classifier",
        last_bn="bn2",
        last_stage=("blocks.5", "blocks.6", "conv_head", "bn2"),  # every block at the final stride, and the head
        num_classes=1000,
    )
    convnext = model_meta("timm:convnext_base")
    assert (convnext.classifier, convnext.last_bn, convnext.last_stage) == ("head.fc", None, ("stages.3", "head"))
    tagged = model_meta("timm:resnet50.a1_in1k")
    assert (tagged.classifier, tagged.last_bn) == ("fc", "layer4.2.bn3")


@pytest.mark.parametrize("name", ["timm:test_resnet", "timm:resnet10t"])
def test_last_bn_is_the_main_branch_not_the_projected_shortcut(name: str) -> None:
    """One block in the last stage, with a projected shortcut: timm runs ``downsample`` (pool, conv, BN) after the
    main branch's ``bn2``, but FixRes tunes the BN of the main branch (the paper's ResNet ``layer4[-1].bn3``)."""
    meta = model_meta(name)
    assert meta.last_bn == "layer4.0.bn2"
    model = build_on_meta(name, 1000)
    assert isinstance(model.get_submodule("layer4.0.downsample.2"), nn.BatchNorm2d)  # the one it must not pick


def test_a_stage_downsampling_with_no_main_branch_beside_it_stays_the_last_bn() -> None:
    """EfficientFormer-L7's last stage starts with ``downsample`` (conv + BN) and has no other BatchNorm: that BN is
    on the path to the pooling, not in a residual shortcut, and stays the answer (names in forward order as timm's
    models run them; fgvc refuses EfficientFormer itself for its two heads)."""
    from fgvc.models.registry import _main_path_bn

    assert _main_path_bn(["layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.2"]) == "layer4.0.bn2"
    assert _main_path_bn(["stages.2.blocks.17.mlp.norm2", "stages.3.downsample.norm"]) == "stages.3.downsample.norm"
    assert _main_path_bn(["s4.b1.conv3.bn", "s4.b1.downsample.bn"]) == "s4.b1.conv3.bn"


def test_resnext101_32x48d_is_the_wsl_model_not_timms_32x8d():
    from torchvision.models.resnet import Bottleneck, ResNet

    ours = build_on_meta("resnext101_32x48d_wsl", 1000)
    with torch.device("meta"):
        reference = ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=48)  # FB's hub model
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    params = sum(p.numel() for p in ours.parameters())
    assert 828e6 < params < 830e6  # 829M in the WSL paper
    assert ours.layer1[0].conv2.groups == 32 and ours.layer1[0].conv2.out_channels == 32 * 48


def test_create_model_sets_classifier_and_meta_and_is_reproducible():
    torch.manual_seed(0)
    first = create_model("timm:tf_efficientnet_lite0", 5)
    torch.manual_seed(0)
    second = create_model("timm:tf_efficientnet_lite0", 5, weights=None)
    assert get_meta(first).num_classes == 5 and first.classifier.out_features == 5
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_get_meta_sees_through_data_parallel_and_compile():
    model = build_on_meta("resnet50", 3)
    meta = get_meta(model)
    assert get_meta(nn.DataParallel(model)) == meta
    assert get_meta(torch.compile(model)) == meta
    with pytest.raises(ValueError, match="create_model"):
        get_meta(nn.Linear(2, 2))


def test_unknown_architecture_lists_registry_and_timm_form():
    with pytest.raises(ConfigError) as err:
        create_model("resnet5O", 10)
    message = str(err.value)
    assert "\n" not in message
    assert all(name in message for name in REGISTRY) and "timm:<name>" in message


def test_bare_timm_name_suggests_the_prefix_and_typo_suggests_close_matches():
    with pytest.raises(ConfigError, match=r"did you mean timm:convnext_base\?"):
        model_meta("convnext_base")
    with pytest.raises(ConfigError, match="timm:convnext_base"):
        model_meta("timm:convnext_bse")


def test_a_cadene_name_outside_the_registry_suggests_timms_port():
    with pytest.raises(ConfigError, match=r"unknown architecture 'se_resnext50_32x4d' \(did you mean "
                                          r"timm:legacy_seresnext50_32x4d\?\)"):  # fmt: skip
        model_meta("se_resnext50_32x4d")


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_num_classes_must_be_a_positive_integer(num_classes):
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("timm:tf_efficientnet_lite0", num_classes)


# --- any resolution -------------------------------------------------------------------------------------------------


def forward_shapes(model: nn.Module, sizes: list[int], device: str = "cpu") -> list[tuple[int, ...]]:
    model.eval()
    with torch.no_grad():
        return [tuple(model(torch.randn(1, 3, s, s, device=device)).shape) for s in sizes]


def scaled(size: int) -> list[int]:
    return [size, size * 3 // 2, size * 2]


@pytest.mark.parametrize("name", ["timm:tf_efficientnet_lite0", "timm:convnext_atto", "resnet50"])
def test_cheap_models_run_at_native_and_1_5x_and_2x(name):
    model = create_model(name, 6)
    assert forward_shapes(model, scaled(get_meta(model).input_size)) == [(1, 6)] * 3


# Real CPU compute at small sizes (InceptionResNet-V2 needs >= 75 px), native / 1.5x / 2x shape-checked on the meta
# device, which runs every shape computation (pooling, concatenation, the classifier) without arithmetic.
SMALL = {
    "senet154": 56,
    "se_resnext101_32x4d": 56,
    "inceptionresnetv2": 100,
    "pnasnet5large": 83,
    "resnet152": 56,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_large_models_run_at_any_resolution(name):
    model = create_model(name, 11)
    assert forward_shapes(model, scaled(SMALL[name])) == [(1, 11)] * 3
    del model
    native = get_meta(build_on_meta(name, 11)).input_size
    assert forward_shapes(build_on_meta(name, 11), scaled(native), device="meta") == [(1, 11)] * 3


def test_wsl_resnext_runs_at_any_resolution_on_meta():
    model = build_on_meta("resnext101_32x48d_wsl", 4)  # 829M parameters: never materialised in tests
    assert forward_shapes(model, scaled(224), device="meta") == [(1, 4)] * 3


@pytest.mark.slow
def test_adaptive_pool_equals_cadene_fixed_pool_at_native_size():
    import pretrainedmodels

    torch.manual_seed(0)
    original = pretrainedmodels.se_resnext101_32x4d(num_classes=1000, pretrained=None).eval()
    ours = create_model("se_resnext101_32x4d", 1000).eval()
    ours.load_state_dict(original.state_dict())
    assert isinstance(original.avg_pool, nn.AvgPool2d) and isinstance(ours.avg_pool, nn.AdaptiveAvgPool2d)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), original(x))


@pytest.mark.slow
def test_pnasnet_matches_cadenes_where_cadenes_runs_and_also_runs_where_it_fails():
    import pretrainedmodels

    torch.manual_seed(0)
    cadene = pretrainedmodels.pnasnet5large(num_classes=1000, pretrained=None).eval()
    cadene.avg_pool = nn.AdaptiveAvgPool2d(1)
    for module in cadene.modules():  # non-trivial BatchNorm statistics, so that a wrong padding shows
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    ours = create_model("pnasnet5large", 1000).eval()
    ours.load_state_dict(cadene.state_dict())
    with torch.no_grad():
        x = torch.randn(1, 3, 75, 75)  # 75 % 16 == 11, a size Cadene's fixed padding handles
        torch.testing.assert_close(ours(x), cadene(x))
        with pytest.raises(RuntimeError):
            cadene(torch.randn(1, 3, 70, 70))  # 70 % 16 == 6: Cadene's padding breaks the cell additions
        assert ours(torch.randn(1, 3, 70, 70)).shape == (1, 1000)


# --- models list ----------------------------------------------------------------------------------------------------


def test_list_models_reports_sizes_normalisation_and_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints" / "resnet152-394f9c45.pth").write_bytes(b"placeholder")
    table = list_models().set_index("name")
    assert list(table.columns) == [
        "params_m",
        "input_size",
        "mean",
        "std",
        "interpolation",
        "weights_present",
        "weights_file",
    ]
    assert set(REGISTRY) <= set(table.index) and "timm:tf_efficientnet_lite0" in table.index
    # Published sizes: ResNet-50 25.6M, SENet-154 115.1M, ResNeXt-101 32x48d 829M, EfficientNet-Lite0 4.7M.
    assert table.loc["resnet50", "params_m"] == pytest.approx(25.56, abs=0.01)
    assert table.loc["senet154", "params_m"] == pytest.approx(115.09, abs=0.01)
    assert table.loc["resnext101_32x48d_wsl", "params_m"] == pytest.approx(828.4, abs=1.0)
    assert table.loc["timm:tf_efficientnet_lite0", "params_m"] == pytest.approx(4.65, abs=0.01)
    assert table.loc["inceptionresnetv2", "input_size"] == 299 and table.loc["inceptionresnetv2", "mean"] == HALF
    assert table.loc["resnet152", "weights_present"]
    assert table.loc["resnet152", "weights_file"] == str(tmp_path / "torch/hub/checkpoints/resnet152-394f9c45.pth")
    assert not table.loc["senet154", "weights_present"]
    assert table.loc["senet154", "weights_file"] == str(tmp_path / "torch/hub/checkpoints/senet154-c7b49a05.pth")
    # The lite0 package ships its checkpoint, so the example timm model always has ImageNet weights locally.
    assert table.loc["timm:tf_efficientnet_lite0", "weights_present"]
    assert table.loc["timm:tf_efficientnet_lite0", "weights_file"].endswith("efficientnet-lite0-57934424.pth")


def test_the_listed_hugging_face_place_is_where_the_file_is_found(tmp_path, monkeypatch):
    """`fgvc models list` showed <cache>/models--timm--X/model.safetensors, where the file is never looked for: the
    cache keeps it in a snapshot named by refs/main."""
    from fgvc.models import expected_weights_file, weights_file

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    shown = expected_weights_file("timm:resnet18")
    assert shown.startswith(str(tmp_path / "hf" / "models--timm--resnet18")) and "/snapshots/<revision>/" in shown
    placed = Path(shown.replace("<revision>", "0123abc"))
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"weights")
    (placed.parents[2] / "refs").mkdir()
    (placed.parents[2] / "refs" / "main").write_text("0123abc")
    assert weights_file("timm:resnet18", "imagenet") == placed


def test_model_spec_is_built_once_per_name():
    assert model_spec("resnet50") is model_spec("resnet50")


def test_generic_timm_metadata_for_a_densenet_and_a_distilled_model() -> None:
    meta = model_meta("timm:densenet121")
    assert meta.last_bn == "features.norm5"
    assert meta.last_stage == ("features.transition3", "features.denseblock4", "features.norm5")
    distilled = r"timm:deit_tiny_distilled_patch16_224: a model with a second \(distillation\) classifier head is not"
    with pytest.raises(ConfigError, match=distilled + " supported; use a variant without one"):
        model_meta("timm:deit_tiny_distilled_patch16_224")


# ByobNets (Identity final_conv), Xception (act4), GhostNet and ReXNet (blocks after the last feature_info entry):
# timm's last feature_info entry is not the last stage there, and stage+bn+fc used to tune no more than bn+fc.
@pytest.mark.parametrize("name", ["resnext26ts", "repvgg_a0", "legacy_xception", "ghostnet_100", "rexnet_100",
                                  "resnet18", "efficientnet_b0", "densenet121"])  # fmt: skip
def test_the_last_stage_holds_the_last_batchnorm_and_trains_more_than_bn_fc(name: str) -> None:
    model = build_on_meta(f"timm:{name}", 10)
    meta = get_meta(model)
    assert meta.last_bn is not None
    assert any(meta.last_bn == stage or meta.last_bn.startswith(stage + ".") for stage in meta.last_stage), meta
    count = {tune: sum(p.numel() for p in trainable_parameters(model, tune)) for tune in ("bn+fc", "stage+bn+fc")}
    assert count["stage+bn+fc"] > 10 * count["bn+fc"], count
    pooled_channels = model.get_submodule(meta.last_bn).num_features
    assert pooled_channels == model.num_features  # the tuned BatchNorm normalises every pooled channel


def test_the_last_stage_follows_forward_order_where_registration_order_differs() -> None:
    """Xception registers the last block's shortcut before its main branch and runs it after; registration order
    left ``block12.skip``/``skipbn`` frozen under stage+bn+fc while the rest of the block trained."""
    meta = get_meta(build_on_meta("timm:legacy_xception", 10))
    assert {"block12.skip", "block12.skipbn", "block12.rep.1", "conv4", "bn4"} <= set(meta.last_stage)
    assert not any(stage.startswith(("block11", "block12.rep.0")) for stage in meta.last_stage)
    # a ModuleList is never called itself: it counts as after the boundary when all of its children are
    assert "incre_modules" in model_meta("timm:hrnet_w18_small").last_stage


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("inception_v3", "the last BatchNorm is one branch (192 of 2048 channels) of Mixed_7c's concat"),
        ("coatnet_0_rw_224", "its last BatchNorm is in stage 1, before the attention stages' LayerNorms"),
        ("volo_d1_224", "its only BatchNorms are in the patch-embedding stem"),
    ],
)
def test_bn_fc_is_refused_where_no_batchnorm_normalises_the_pooled_features(name: str, why: str) -> None:
    model = build_on_meta(f"timm:{name}", 10)
    assert get_meta(model).last_bn is None, why
    with pytest.raises(ConfigError, match=r"needs a BatchNorm that normalises the pooled features.*stage\+bn\+fc"):
        trainable_parameters(model, "bn+fc")
    assert trainable_parameters(model, "stage+bn+fc")  # the last stage is still there to tune


def test_a_timm_model_whose_feature_info_names_a_missing_module_still_builds() -> None:
    """Twins' feature_info names ``block.0``, which does not exist: stage 1 must still work; stage+bn+fc is refused."""
    model = build_on_meta("timm:twins_svt_small", 10)
    assert get_meta(model).last_stage == ()
    with pytest.raises(ConfigError, match="does not know the last stage"):
        trainable_parameters(model, "stage+bn+fc")


def test_vit_family_models_are_built_to_run_at_any_resolution() -> None:
    """timm fixes ViT/DeiT/Swin's input size unless built with dynamic_img_size; FixRes changes the resolution."""
    model = create_model("timm:deit_tiny_patch16_224", 3).eval()
    assert not get_meta(model).fixed_input_size
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_a_model_that_runs_at_one_size_only_is_refused_at_another(tiny_demo_root, tmp_path) -> None:
    from conftest import tiny_config

    from fgvc.engine.loaders import load_split, make_loader
    from fgvc.engine.runtime import setup_runtime

    meta = model_meta("timm:coatnet_0_rw_224")
    assert meta.fixed_input_size and meta.input_size == 224
    cfg = tiny_config(tiny_demo_root, tmp_path)
    index = load_split(cfg, "train")
    rt = setup_runtime(cfg.runtime)
    with pytest.raises(ConfigError, match=r"timm:coatnet_0_rw_224 runs at 224 px only .* not 288 px"):
        make_loader(cfg, rt, index, "test", 288, 4, False, meta)
    make_loader(cfg, rt, index, "test", 224, 4, False, meta)  # its own size is fine


def test_a_deprecated_timm_name_gets_the_config_of_the_model_timm_maps_it_to() -> None:
    """timm builds vit_base_patch16_224_in21k as vit_base_patch16_224.augreg_in21k, whose normalisation is 0.5/0.5;
    the old name has no pretrained config of its own, and fgvc used ImageNet's statistics for it."""
    import timm

    meta = model_meta("timm:vit_base_patch16_224_in21k")
    current = timm.models.get_pretrained_cfg("vit_base_patch16_224.augreg_in21k")
    assert (meta.mean, meta.std, meta.interpolation) == (tuple(current.mean), tuple(current.std), current.interpolation)
    assert meta.arch == "timm:vit_base_patch16_224_in21k"  # the name the user gave stays the model's name
    assert any("augreg_in21k" in str(place) for place in model_spec(meta.arch).locations())


@pytest.mark.parametrize(("name", "last_bn"), [("mobilenetv4_conv_small", "norm_head"),
                                               ("efficientvit_b0", "head.in_conv.norm")])  # fmt: skip
def test_a_head_that_widens_after_the_trunk_keeps_bn_fc(name: str, last_bn: str) -> None:
    """MobileNetV4's head conv widens 960 -> 1280 channels before pooling, and EfficientViT's classifier MLP has a
    LayerNorm on the pooled vector: neither makes the BatchNorm before pooling a wrong choice."""
    assert model_meta(f"timm:{name}").last_bn == last_bn


def test_a_patch_model_is_refused_at_a_resolution_its_patches_do_not_divide(tiny_demo_root, tmp_path) -> None:
    from conftest import tiny_config

    from fgvc.engine.loaders import load_split, make_loader
    from fgvc.engine.runtime import setup_runtime

    meta = model_meta("timm:vit_base_patch16_224_in21k")  # a deprecated name: built to take other sizes too
    assert (meta.fixed_input_size, meta.input_multiple) == (False, 16)
    cfg = tiny_config(tiny_demo_root, tmp_path)
    rt, index = setup_runtime(cfg.runtime), load_split(cfg, "train")
    with pytest.raises(ConfigError, match=r"divisible by its patch size 16, not 40 px: use 32 or 48"):
        make_loader(cfg, rt, index, "test", 40, 4, False, meta)
    make_loader(cfg, rt, index, "test", 48, 4, False, meta)
