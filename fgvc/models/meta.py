"""What the rest of fgvc needs to know about a built model, carried on the model itself.

The engine, the transforms and the predictor never look at layer names: they read :class:`ModelMeta` (normalisation,
native resolution, which module is the classifier, the last BatchNorm before pooling, the last stage) from
``model.fgvc_meta``. That keeps stage 2 architecture-agnostic, unlike the reference code's name matching.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelMeta:
    """Per-architecture facts, resolved once when the model is built.

    Attributes:
        arch: The registry name as given (``"senet154"``, ``"timm:convnext_base"``).
        mean: Per-channel mean in 0..1 units, RGB order.
        std: Per-channel standard deviation in 0..1 units, RGB order.
        input_size: Native (pretraining) resolution in pixels.
        interpolation: ``"bicubic"`` or ``"bilinear"``, as the weights were trained.
        classifier: Name of the classifier module in ``named_modules()``.
        last_bn: Name of the last BatchNorm before global pooling, or None for models without BatchNorm.
        last_stage: Names of the modules that form the last stage (FixRes "layer 4"; PNASNet: its last three cells).
        num_classes: Number of classifier outputs.
        fixed_input_size: The model runs at ``input_size`` only (timm's CoAtNet, MaxViT, BEiT, LeViT...): FixRes's
            change of resolution cannot apply. ViT, DeiT, Swin and EVA are built with timm's ``dynamic_img_size``.
        input_multiple: Resolutions must be multiples of it (a ViT's patch size; 1 for CNNs).
    """

    arch: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    interpolation: str
    classifier: str
    last_bn: str | None
    last_stage: tuple[str, ...]
    num_classes: int
    fixed_input_size: bool = False
    input_multiple: int = 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DataParallel/DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(orig := getattr(model, "_orig_mod", None), nn.Module):
            model = orig
        else:
            return model


META_ATTRIBUTE = "fgvc_meta"


def rgb(values: Sequence[float]) -> tuple[float, float, float]:
    """Three per-channel values (a mean or a std) from a list or tuple, as a checkpoint or timm's config holds them."""
    red, green, blue = values
    return float(red), float(green), float(blue)


def set_meta(model: nn.Module, meta: ModelMeta) -> None:
    """Attach ``meta`` to the model inside any DDP/compile wrapper, where :func:`get_meta` reads it."""
    setattr(unwrap_model(model), META_ATTRIBUTE, meta)


def get_meta(model: nn.Module) -> ModelMeta:
    """The :class:`ModelMeta` attached by ``create_model``, also through DDP/compile wrappers."""
    meta = getattr(unwrap_model(model), META_ATTRIBUTE, None)
    if not isinstance(meta, ModelMeta):
        raise ValueError(f"{type(model).__name__} carries no fgvc_meta; build it with fgvc.models.create_model")
    return meta


@contextmanager
def modes_restored(net: nn.Module) -> Iterator[None]:
    """Every module's train/eval flag as it was, after probing forwards that switch the model to eval mode."""
    modes = {module: module.training for module in net.modules()}
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
