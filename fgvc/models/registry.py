"""The model zoo: names -> builders + metadata, ``create_model``, ImageNet weight lookup and ``list_models``.

Registry names are the architectures of the FixRes paper (Cadene's pretrainedmodels for SENet-154, SE-ResNeXt-101 and
Inception-ResNet-V2; timm's key-compatible port for PNASNet-5, see below; timm for the ResNets; the 32x48d WSL ResNeXt
built explicitly). Any other timm model
is ``timm:<name>``; its metadata comes from timm's pretrained config and its classifier from timm's API. Cadene's
fixed-size average pools are replaced by adaptive ones so that every model runs at any resolution, which is the
point of FixRes.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache, partial
from pathlib import Path
from typing import Any, cast

import pandas as pd
import timm
import torch
from torch import nn

from fgvc.errors import ConfigError, WeightsError
from fgvc.models.meta import ModelMeta, modes_restored, rgb, set_meta
from fgvc.models.weights import WeightsLocation, hf_file, hf_hub_cache, hub_file, lite0_package_file, load_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"
HF_URL = "https://huggingface.co/"
WSL_URL = "https://download.pytorch.org/models/ig_resnext101_32x48-3e41cc8a.pth"
EXAMPLE_TIMM_MODELS = ("timm:tf_efficientnet_lite0", "timm:convnext_base")  # also shown by `fgvc models list`


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture, what it is (meta, for 1000 classes) and where its ImageNet weights lie.

    ``locations`` is a function because the caches are read from the environment ($TORCH_HOME, $HF_HOME) at lookup
    time, not at import time.
    """

    build: Callable[[int], nn.Module]
    meta: ModelMeta
    locations: Callable[[], list[WeightsLocation]]
    download_url: str
    also_loads: str = ""  # another download that loads as well (a Cadene model's timm twin)


# --- Cadene's pretrainedmodels ---------------------------------------------------------------------------------------


def _import_pretrainedmodels() -> Any:
    """The package, imported on first use (slow: 5 s). Its DPN code has ``is 'str'`` comparisons that Python 3.12
    reports as SyntaxWarnings when the files are compiled at import, which would bury fgvc's one-line errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        import pretrainedmodels
    return pretrainedmodels


def _build_cadene(name: str, pool: str, num_classes: int) -> nn.Module:
    pretrainedmodels = _import_pretrainedmodels()
    model = pretrainedmodels.__dict__[name](num_classes=num_classes, pretrained=None)
    setattr(model, pool, nn.AdaptiveAvgPool2d(1))  # fixed AvgPool2d(7/8/11) only fits the native size
    return model


def _cadene_spec(
    name: str, build: Callable[[int], nn.Module], last_bn: str, last_stage: tuple[str, ...], timm_twin: str | None
) -> ModelSpec:
    """A Cadene architecture. ``timm_twin`` is timm's port with the same state-dict keys (up to the classifier's name,
    see ``weights._CLASSIFIER_ALIASES``), whose weight files are accepted as well (after Cadene's own file)."""
    pretrained_settings = _import_pretrainedmodels().pretrained_settings
    # The models only carry mean/std when built with weights; the settings table always has them.
    settings = pretrained_settings[name]["imagenet"]
    url = settings["url"]
    meta = ModelMeta(
        arch=name,
        mean=tuple(settings["mean"]),
        std=tuple(settings["std"]),
        input_size=int(settings["input_size"][-1]),
        interpolation="bilinear",  # Cadene's and the FixRes code's evaluation transform
        classifier="last_linear",
        last_bn=last_bn,
        last_stage=last_stage,
        num_classes=1000,
    )
    twin = partial(_timm_locations, timm_twin) if timm_twin else list
    also = _timm_download_url(timm_twin) if timm_twin else ""
    return ModelSpec(build, meta, lambda: [hub_file(Path(url).name), *twin()], url, also)


# --- ResNets through timm ---------------------------------------------------------------------------------------------


def _build_timm(model_name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """timm's model; one whose pretrained config fixes the input size is built to take any size where timm can
    (``dynamic_img_size``: ViT, DeiT, Swin, EVA), since stage 2 and the sweep change the resolution."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or getattr(cfg, "fixed_input_size", False):  # None: a deprecated name, whose config is elsewhere
        try:
            return timm.create_model(model_name, pretrained=False, num_classes=num_classes, dynamic_img_size=True,
                                     **kwargs)  # fmt: skip
        except TypeError:  # no such option: it runs at its pretraining size only (ModelMeta.fixed_input_size)
            pass
    return timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)


def _resnet_meta(name: str) -> ModelMeta:
    return ModelMeta(
        arch=name,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=224,
        interpolation="bilinear",
        classifier="fc",
        last_bn="layer4.2.bn3",
        last_stage=("layer4",),
        num_classes=1000,
    )


def _resnet_spec(name: str) -> ModelSpec:
    """timm's ResNet, which has torchvision's state-dict keys: torchvision's files (V1 first, the weights the FixRes
    paper fine-tuned) and timm's own default weights are all accepted."""
    import torchvision.models as tvm

    weights_enum = tvm.get_model_weights(name)
    torchvision_files = [Path(weights_enum.IMAGENET1K_V1.url).name, Path(weights_enum.IMAGENET1K_V2.url).name]
    cfg = timm.models.get_pretrained_cfg(name)

    def locations() -> list[WeightsLocation]:
        found = [hub_file(file) for file in torchvision_files]
        if cfg is not None and cfg.hf_hub_id:
            found += [hf_file(cfg.hf_hub_id, "model.safetensors"), hf_file(cfg.hf_hub_id, "pytorch_model.bin")]
        if cfg is not None and _url(cfg):
            found.append(hub_file(Path(_url(cfg)).name))
        return found

    return ModelSpec(partial(_build_timm, name), _resnet_meta(name), locations, weights_enum.IMAGENET1K_V1.url)


def _build_resnext101_32x48d(num_classes: int) -> nn.Module:
    from timm.models.resnet import Bottleneck, ResNet

    # timm's ig_resnext101_32x48d alias builds a 32x8d; this is the 829M-parameter WSL model, keys as torchvision's.
    return ResNet(block=Bottleneck, layers=(3, 4, 23, 3), cardinality=32, base_width=48,  # type: ignore[arg-type]
                  num_classes=num_classes)  # fmt: skip  (timm annotates block as an instance, it takes the class)


def _wsl_spec() -> ModelSpec:
    meta = _resnet_meta("resnext101_32x48d_wsl")
    return ModelSpec(_build_resnext101_32x48d, meta, lambda: [hub_file(Path(WSL_URL).name)], WSL_URL)


# --- any timm model ---------------------------------------------------------------------------------------------------


_SHORTCUTS = frozenset({"downsample", "shortcut", "short_cut", "skip"})  # module names of residual projections


_OTHER_NORMS = (nn.LayerNorm, nn.GroupNorm)  # timm's LayerNorm2d subclasses nn.LayerNorm


def last_batchnorm(model: nn.Module, input_size: int = 224) -> str | None:
    """Name of the last ``BatchNorm2d`` of the main path in forward order, or None where no BatchNorm normalises the
    pooled features: a model without one, or a hybrid whose BatchNorms are followed by LayerNorm/GroupNorm blocks
    (CoAtNet, MaxViT, VOLO, XCiT), where the last BatchNorm sits in an early stage and tuning it is not FixRes.

    Forward order matters where registration order differs from execution order. The probe is one batch-1 forward
    in eval mode on the model's own device: shape-only and free on the meta device (how fgvc calls it), a real
    forward otherwise; train/eval flags are restored. Falls back to registration order if the forward fails.

    A residual block whose shortcut is projected (timm's ResNets with one block in the last stage) runs its
    ``downsample`` BatchNorm after the main branch's; FixRes tunes the main branch's (``layer4[-1].bn3``), so
    a shortcut's BatchNorm gives way to its block's main branch (see :func:`_main_path_bn`).
    """
    names = {id(module): name for name, module in model.named_modules()}
    norms = [module for module in model.modules() if isinstance(module, (nn.BatchNorm2d, *_OTHER_NORMS))]
    if not any(isinstance(norm, nn.BatchNorm2d) for norm in norms):
        return None
    seen: list[str] = []
    pooled: set[str] = set()  # norms that ran on pooled (B, C) features, after global pooling

    def record(module: nn.Module, _inputs: tuple, output: object) -> None:
        seen.append(names[id(module)])
        if isinstance(output, torch.Tensor) and output.dim() <= 2:
            pooled.add(names[id(module)])

    if not _probe(model, input_size, [m.register_forward_hook(record) for m in norms]):
        seen = []
    order = seen or [names[id(norm)] for norm in norms]
    batchnorms = [name for name in order if isinstance(model.get_submodule(name), nn.BatchNorm2d)]
    if not batchnorms:  # none ran in the forward (only other norms did)
        return None
    last = _main_path_bn(batchnorms)
    last_run = max(i for i, name in enumerate(order) if name == batchnorms[-1])
    after = order[last_run + 1 :]
    if any(isinstance(model.get_submodule(name), _OTHER_NORMS) and name not in pooled for name in after):
        return None  # LayerNorm/GroupNorm blocks run after the last BatchNorm: it does not normalise what is pooled
    return last


def _main_path_bn(order: list[str]) -> str:
    """The last BatchNorm of ``order``, or, when that one sits in a residual block's shortcut, the last one of the same
    block's main branch. A module named ``downsample`` with no main branch next to it is a stage's own downsampling
    (EfficientFormer's last stage has no other BatchNorm): it stays the answer."""
    last = order[-1]
    parts = last.split(".")
    shortcut = next((i for i, part in enumerate(parts) if part in _SHORTCUTS), None)
    if shortcut is None:
        return last
    block = "".join(part + "." for part in parts[:shortcut])
    main = [name for name in order if name.startswith(block) and not _SHORTCUTS.intersection(name.split("."))]
    return main[-1] if main else last


def _timm_classifier(model: nn.Module, model_name: str) -> str:
    names = {id(module): name for name, module in model.named_modules()}
    head = cast(Any, model).get_classifier()  # every timm model has it
    if id(head) not in names:  # e.g. distilled DeiT/LeViT return (head, head_dist)
        raise ConfigError(
            f"timm:{model_name}: a model with a second (distillation) classifier head is not supported; use a "
            "variant without one where timm has it (deit_*_distilled_* -> deit_*), else another architecture"
        )
    return names[id(head)]


def _timm_last_stage(model: nn.Module, classifier: str, input_size: int = 224) -> tuple[str, ...]:
    """What "layer 4" means for a model that is not a ResNet: every parametrised module that runs after timm's
    second-to-last feature map, up to the classifier (ResNet's ``layer4``; EfficientNet's ``blocks.5``, ``blocks.6``,
    ``conv_head`` and ``bn2``; ConvNeXt's ``stages.3`` and head norm).

    Reading the stage off the last ``feature_info`` entry instead fails where that entry has no parameters (the
    Identity ``final_conv`` of timm's ByobNets, Xception's ``act4``) or is not the last block (GhostNet, ReXNet):
    stage 2 then tuned nothing more than ``bn+fc``. "After" is forward order, from one hooked batch-1 forward (free
    on the meta device): legacy Xception registers ``block12.skip`` before ``block12.rep`` but runs it after, so
    registration order left the last block's shortcut frozen. Registration order is the fallback where that forward
    fails or never calls the boundary module itself (CoaT's is a ``ModuleList``).
    """
    feature_info = getattr(model, "feature_info", None)
    if not feature_info:
        return ()
    if len(feature_info) < 2:
        return (feature_info[-1]["module"],)
    boundary = feature_info[-2]["module"]
    try:
        model.get_submodule(boundary)
    except AttributeError:  # feature_info names a module that does not exist (Twins' "block.0")
        return ()
    calls = _first_calls(model, boundary, input_size)
    following = _outermost_after(model, *calls) if calls is not None else _registered_after(model, boundary)
    return tuple(
        name
        for name in following
        if name != classifier and any(True for _ in model.get_submodule(name).parameters())
    )


def _first_calls(model: nn.Module, boundary: str, input_size: int) -> tuple[dict[str, int], int] | None:
    """When each module is first called in one forward pass and when ``boundary``'s first call returns, on one
    clock; None if the forward fails."""
    first_call: dict[str, int] = {}
    boundary_end: list[int] = []
    clock = iter(range(1 << 62))

    def called(name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:  # returns None: a pre-hook's return value replaces the module's input
            first_call.setdefault(name, next(clock))

        return hook

    hooks = [module.register_forward_pre_hook(called(name)) for name, module in model.named_modules()]
    hooks.append(model.get_submodule(boundary).register_forward_hook(lambda *_: boundary_end.append(next(clock))))
    if not _probe(model, input_size, hooks) or not boundary_end:
        return None
    return first_call, boundary_end[0]


def _probe(model: nn.Module, input_size: int, hooks: list[torch.utils.hooks.RemovableHandle]) -> bool:
    """One batch-1 eval forward for ``hooks`` (removed after it): shape-only and free on the meta device, a real
    forward otherwise; train/eval flags are restored. False where it fails (also ops without a meta kernel)."""
    device = next(model.parameters()).device
    try:
        with modes_restored(model), torch.no_grad():
            model.eval()(torch.zeros(1, 3, input_size, input_size, device=device))
    except (RuntimeError, TypeError, ValueError):
        return False
    finally:
        for hook in hooks:
            hook.remove()
    return True


def _outermost_after(model: nn.Module, first_call: dict[str, int], boundary_end: int) -> list[str]:
    """The outermost modules wholly after the boundary, in registration order: one first called after it returned,
    or one never called itself (a ``ModuleList``) whose parametrised children all are."""

    def wholly_after(name: str, module: nn.Module) -> bool:
        if name in first_call:
            return first_call[name] > boundary_end
        if any(True for _ in module.parameters(recurse=False)):
            return False
        with_params = [(f"{name}.{child}", sub) for child, sub in module.named_children()
                       if any(True for _ in sub.parameters())]  # fmt: skip
        return bool(with_params) and all(wholly_after(*item) for item in with_params)

    found: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for child, sub in module.named_children():
            name = prefix + child
            if wholly_after(name, sub):
                found.append(name)
            else:
                walk(name + ".", sub)

    walk("", model)
    return found


def _registered_after(model: nn.Module, boundary: str) -> list[str]:
    """The boundary module's later siblings, then its parent's, up to the top level, in registration order."""
    parts = boundary.split(".")
    following: list[str] = []
    for depth in range(len(parts), 0, -1):
        parent = ".".join(parts[: depth - 1])
        children = [name for name, _ in model.get_submodule(parent).named_children()]
        later = children[children.index(parts[depth - 1]) + 1 :]
        following += [f"{parent}.{name}" if parent else name for name in later]
    return following


def _patch_size(model: nn.Module) -> int:
    """The multiple a resolution must be of: a ViT's patch size (timm asserts it even with ``dynamic_img_size``)."""
    size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(size, tuple | list) and size and all(isinstance(v, int) for v in size):
        return max(size)
    return size if isinstance(size, int) else 1


def _url(cfg: timm.models.PretrainedCfg) -> str:
    """A pretrained config's download URL ("" if none); timm's type also allows a (url, ...) pair."""
    url = cfg.url
    return url if isinstance(url, str) else url[0] if url else ""


def _timm_locations(model_name: str) -> list[WeightsLocation]:
    cfg = timm.models.get_pretrained_cfg(model_name)
    found: list[WeightsLocation] = []
    if cfg is not None and cfg.hf_hub_id:
        named = getattr(cfg, "hf_hub_filename", None)
        files = [named] if named else []
        found += [hf_file(cfg.hf_hub_id, f) for f in [*files, "model.safetensors", "pytorch_model.bin"]]
    if cfg is not None and _url(cfg) and not _url(cfg).endswith(".npz"):  # Google's JAX files: not a torch checkpoint
        found.append(hub_file(Path(_url(cfg)).name))
    base, tag = timm.models.split_model_name_tag(model_name)
    if base == "tf_efficientnet_lite0" and tag in ("", "in1k"):
        found.append(lite0_package_file())  # same ImageNet weights, efficientnet-pytorch naming (mapped on load)
    return found


def _timm_download_url(model_name: str) -> str:
    """timm's Hugging Face file where there is one: the config's other URL may be a file fgvc cannot read (Google's
    ``.npz`` for ViTs) or one in the original authors' naming."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return "(timm has no pretrained weights for this model)"
    if cfg.hf_hub_id:
        file = getattr(cfg, "hf_hub_filename", None) or "model.safetensors"
        return f"{HF_URL}{cfg.hf_hub_id}/resolve/main/{file}"
    return _url(cfg)


def _unknown_timm_model(model_name: str) -> ConfigError:
    close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
    close += [name for name in timm.list_models(f"*{model_name}*")[:5] if name not in close]
    hint = f"close matches: {', '.join(TIMM_PREFIX + n for n in close[:5])}" if close else "see timm.list_models()"
    return ConfigError(f"unknown timm model '{model_name}'; {hint}")


def _timm_spec(model_name: str) -> ModelSpec:
    if not timm.is_model(model_name):
        raise _unknown_timm_model(model_name)
    with torch.device("meta"):
        probe = _build_timm(model_name, 1000)
    # timm still builds its deprecated names (vit_base_patch16_224_in21k -> vit_base_patch16_224.augreg_in21k), but
    # their configs (normalisation, crop, weights files) are under the current name only
    cfg_name, cfg = model_name, timm.models.get_pretrained_cfg(model_name)
    resolved = getattr(probe, "pretrained_cfg", None) or {}
    if cfg is None and resolved.get("architecture") and resolved.get("tag"):
        cfg_name = f"{resolved['architecture']}.{resolved['tag']}"
        cfg = timm.models.get_pretrained_cfg(cfg_name)
    size = int(cfg.input_size[-1]) if cfg is not None else 224
    classifier = _timm_classifier(probe, model_name)
    last_bn = last_batchnorm(probe, size)
    trunk_width = getattr(probe, "num_features", None)  # a head conv after it may widen (MobileNetV4), never narrow
    bn_width = getattr(probe.get_submodule(last_bn), "num_features", 0) if last_bn is not None else 0
    if last_bn is not None and isinstance(trunk_width, int) and bn_width < trunk_width:
        last_bn = None  # one branch of a concat (Inception-V3's Mixed_7c): most pooled channels would not adapt
    meta = ModelMeta(
        arch=TIMM_PREFIX + model_name,
        mean=rgb(cfg.mean) if cfg is not None else IMAGENET_MEAN,
        std=rgb(cfg.std) if cfg is not None else IMAGENET_STD,
        input_size=size,
        interpolation=cfg.interpolation if cfg is not None else "bicubic",
        classifier=classifier,
        last_bn=last_bn,
        last_stage=_timm_last_stage(probe, classifier, size),
        num_classes=1000,
        fixed_input_size=bool(getattr(cfg, "fixed_input_size", False)) and not getattr(probe, "dynamic_img_size", 0),
        input_multiple=_patch_size(probe),
    )
    return ModelSpec(
        partial(_build_timm, model_name), meta, partial(_timm_locations, cfg_name), _timm_download_url(cfg_name)
    )


# --- the registry -----------------------------------------------------------------------------------------------------

REGISTRY: dict[str, Callable[[], ModelSpec]] = {
    "senet154": partial(
        _cadene_spec,
        "senet154",
        partial(_build_cadene, "senet154", "avg_pool"),
        "layer4.2.bn3",
        ("layer4",),
        "legacy_senet154",
    ),
    "se_resnext101_32x4d": partial(
        _cadene_spec,
        "se_resnext101_32x4d",
        partial(_build_cadene, "se_resnext101_32x4d", "avg_pool"),
        "layer4.2.bn3",
        ("layer4",),
        "legacy_seresnext101_32x4d",
    ),
    "inceptionresnetv2": partial(
        _cadene_spec,
        "inceptionresnetv2",
        partial(_build_cadene, "inceptionresnetv2", "avgpool_1a"),
        "conv2d_7b.bn",
        ("repeat_2", "block8", "conv2d_7b"),
        "inception_resnet_v2",  # the same keys but the classifier's, `classif` there (renamed on load)
    ),
    # Cadene's PNASNet hard-codes TensorFlow's "SAME" padding for 331 px and fails at half of all sizes (those with
    # size % 16 in 3..10, e.g. 662 = 2x native). timm's port has Cadene's state-dict keys (so Cadene's checkpoint
    # loads), computes the same function where Cadene's runs, and pads dynamically; built with Cadene's head dropout.
    # PNASNet has no BatchNorm after its last concatenation: the last one in forward order sits in cell_11's last
    # branch. Its FixRes variant tunes the last three cells.
    "pnasnet5large": partial(
        _cadene_spec,
        "pnasnet5large",
        partial(_build_timm, "pnasnet5large", drop_rate=0.5),
        # bn+fc here tunes one branch's BN of that concat (864 of 4,320 pooled channels), kept for this registry model;
        # the generic timm rule refuses bn+fc for timm:pnasnet5large. The paper's PNASNet rows use stage+bn+fc.
        "cell_11.comb_iter_4_left.bn_sep_2",
        ("cell_9", "cell_10", "cell_11"),
        "pnasnet5large",
    ),
    "resnet50": partial(_resnet_spec, "resnet50"),
    "resnet152": partial(_resnet_spec, "resnet152"),
    "resnext101_32x48d_wsl": _wsl_spec,
}


@cache
def model_spec(name: str) -> ModelSpec:
    """The spec for a registry name or ``timm:<name>``; unknown names are a :class:`ConfigError` naming the options."""
    if name in REGISTRY:
        return REGISTRY[name]()
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name[len(TIMM_PREFIX) :])
    # timm's ports of Cadene's other models (se_resnext50_32x4d -> legacy_seresnext50_32x4d) take Cadene's files
    port = next((n for n in (name, f"legacy_{name}", "legacy_" + name.replace("_", "", 1)) if timm.is_model(n)), None)
    hint = f" (did you mean {TIMM_PREFIX}{port}?)" if port else ""
    raise ConfigError(
        f"unknown architecture '{name}'{hint}; choose one of {', '.join(REGISTRY)}, or any timm model as "
        f"{TIMM_PREFIX}<name> (e.g. {EXAMPLE_TIMM_MODELS[0]})"
    )


def model_meta(name: str, num_classes: int = 1000) -> ModelMeta:
    """The metadata of an architecture without building real weights (timm models are probed on the meta device)."""
    return replace(model_spec(name).meta, num_classes=num_classes)


def find_imagenet_weights(name: str) -> Path | None:
    """The first local ImageNet checkpoint for ``name`` in the standard places, or None. Never downloads."""
    for location in model_spec(name).locations():
        found = location.find()
        if found is not None:
            return found
    return None


def _drop_in_location(name: str) -> WeightsLocation | None:
    """Where the file at the spec's download URL goes, if it can just be copied there."""
    spec = model_spec(name)
    file = Path(spec.download_url).name
    return next((loc for loc in spec.locations() if loc.drop_in and loc.file == file), None)


def expected_weights_file(name: str) -> str:
    """Where ``name``'s ImageNet weights are expected: the drop-in file for its download URL, else the first place."""
    target = _drop_in_location(name)
    locations = model_spec(name).locations()
    if target is None and not locations:
        return ""
    target = target or locations[0]
    if not target.drop_in and "/models--" in target.place:  # a Hugging Face cache keeps its files in snapshots
        return f"{target.place}/snapshots/<revision>/{target.file}"
    return f"{target.place}/{target.file}"


def _no_weights_error(name: str) -> WeightsError:
    spec = model_spec(name)
    places: dict[str, list[str]] = {}
    for location in spec.locations():
        places.setdefault(location.place, []).append(location.file)
    looked = "; ".join(f"{', '.join(files)} in {place}" for place, files in places.items())
    target = _drop_in_location(name)
    fix = f"copy it to {target.place}, or pass --weights PATH" if target else "pass it as --weights PATH"
    if spec.download_url.startswith(HF_URL):  # the cache fgvc reads can be copied over as it is
        repo = spec.download_url[len(HF_URL) :].split("/resolve/")[0]
        folder = f"models--{repo.replace('/', '--')}"
        fix += f", or copy the {folder} folder of that machine's Hugging Face cache into {hf_hub_cache()}"
    install = next((f"{loc.install}, or " for loc in spec.locations() if loc.install), "")  # one command is simplest
    also = f"; timm's copy loads too: {spec.also_loads}" if spec.also_loads else ""
    return WeightsError(
        f"no ImageNet weights for {name}: looked for {looked}; {install}download {spec.download_url} on a connected "
        f"machine and {fix}{also}"
    )


def create_model(name: str, num_classes: int, weights: str | Path | None = None) -> nn.Module:
    """Build ``name`` with a ``num_classes`` classifier and attach its :class:`ModelMeta` as ``model.fgvc_meta``.

    Args:
        name: A registry name (see :data:`REGISTRY`) or ``timm:<model>``.
        num_classes: Classifier outputs; the pretrained classifier is kept only if it has this size.
        weights: None for random init, ``"imagenet"`` for the local ImageNet checkpoint (see
            :func:`find_imagenet_weights`), or a checkpoint path (see :func:`fgvc.models.weights.load_weights`).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    spec = model_spec(name)
    path = weights_file(name, weights)  # before building: a missing file should not cost a 115M-parameter init
    model = spec.build(num_classes)
    set_meta(model, replace(spec.meta, num_classes=num_classes))
    if path is not None:
        head = model.get_submodule(spec.meta.classifier)
        fresh = [p.detach().clone() for p in head.parameters()]
        load_weights(model, path)
        if all(torch.equal(a, b) for a, b in zip(fresh, head.parameters(), strict=True)):
            _zero_init(head)
    return model


def _zero_init(head: nn.Module) -> None:
    """A new classifier on pretrained features starts at zero (as BiT does): uniform predictions, loss ln(C).

    The default init gives large logits on ImageNet features (a starting loss of ~7 for 16 classes) and wastes the
    first epochs of a short fine-tune undoing them.
    """
    with torch.no_grad():
        for param in head.parameters():
            param.zero_()


def weights_file(name: str, weights: str | Path | None) -> Path | None:
    """The file ``weights`` means for ``name`` (None for random init); ``imagenet`` depends on the machine's caches,
    so training records which file it was."""
    if weights is None:
        return None
    if str(weights) == "imagenet":
        found = find_imagenet_weights(name)
        if found is None:
            raise _no_weights_error(name)
        return found
    path = Path(weights).expanduser()
    if not path.is_file():
        what = "a folder, not a weights file" if path.is_dir() else "no such weights file"
        raise WeightsError(f"{path}: {what}; check --weights (model.weights in a recipe), or use imagenet or none")
    return path


def count_parameters(name: str) -> int:
    """Parameter count with a 1000-class head, built on the meta device (no memory, even for 829M parameters)."""
    with torch.device("meta"):
        model = model_spec(name).build(1000)
    return sum(p.numel() for p in model.parameters())


def list_models(names: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per architecture: size, native resolution, normalisation and whether ImageNet weights are on disk.

    Args:
        names: Architectures to list; default the registry plus :data:`EXAMPLE_TIMM_MODELS`.
    """
    rows = []
    for name in names if names is not None else [*REGISTRY, *EXAMPLE_TIMM_MODELS]:
        meta = model_meta(name)
        found = find_imagenet_weights(name)
        rows.append(
            {
                "name": name,
                "params_m": round(count_parameters(name) / 1e6, 2),
                "input_size": meta.input_size,
                "mean": meta.mean,
                "std": meta.std,
                "interpolation": meta.interpolation,
                "weights_present": found is not None,
                "weights_file": str(found) if found is not None else expected_weights_file(name),
            }
        )
    return pd.DataFrame(rows)
