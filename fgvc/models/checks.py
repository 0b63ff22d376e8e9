"""Whether an architecture can run a setting, answered before any data is read or any epoch is trained.

Some architectures take only certain input sizes without saying so in their config (DLA's and HRNet's feature maps must
line up after their down- and up-sampling, HaloNet's blocks need sizes divisible by its halo windows); a wrong size
used to surface as a traceback from deep inside timm, after the dataset read, or for ``fgvc train`` after a member's
whole stage 1. The model's forward is traced on the meta device: shapes only, no memory, no arithmetic.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fgvc.errors import ConfigError
from fgvc.models.meta import ModelMeta

_NEARBY = 4  # sizes either side tried for the suggestion, in steps of 32
# Largest side fgvc resizes images to. FixRes' resolutions are 224-800 px; a typo beyond this (``--res 100000``) used to
# end in an OpenCV out-of-memory traceback from inside a loader worker, after the dataset read.
MAX_RES = 4096


def check_resolution(meta: ModelMeta, res: int) -> None:
    """A :class:`ConfigError` naming sizes that work if ``meta.arch`` cannot take ``res`` x ``res`` images."""
    if not 1 <= res <= MAX_RES:
        raise ConfigError(f"resolution {res} px is outside 1..{MAX_RES}, the sizes fgvc resizes images to (FixRes "
                          "trains at 224-448 and tests at 1.15-1.7 x that); check the value")  # fmt: skip
    if meta.fixed_input_size and res != meta.input_size:
        raise ConfigError(
            f"{meta.arch} runs at {meta.input_size} px only (timm fixes its input size), not {res} px: FixRes needs a "
            "model that takes any size (CNNs, or timm's ViT/DeiT/Swin/EVA)"
        )
    if res % meta.input_multiple:
        step = meta.input_multiple
        below, above = res // step * step, (res // step + 1) * step
        raise ConfigError(f"{meta.arch} takes resolutions divisible by its patch size {step}, not {res} px: use "
                          f"{below} or {above}")  # fmt: skip
    problem = _forward_problem(meta.arch, res)
    if problem is None or _forward_problem(meta.arch, meta.input_size) is not None:
        return  # it runs; or the trace fails at the native size too, so it tells nothing about sizes
    step = max(32, meta.input_multiple)
    nearby = sorted({max(step, (res // step + k) * step) for k in range(-_NEARBY, _NEARBY + 1)} - {res},
                    key=lambda size: (abs(size - res), size))  # fmt: skip
    working = [size for size in nearby if _forward_problem(meta.arch, size) is None][:2]
    suggestion = f"sizes near it that work: {' or '.join(str(s) for s in sorted(working))}" if working else (
        f"it runs at {meta.input_size} px")  # fmt: skip
    raise ConfigError(f"{meta.arch} cannot take {res} px images ({problem}); {suggestion}")


@functools.lru_cache(maxsize=256)
def _forward_problem(arch: str, res: int) -> str | None:
    """None if a batch of two ``res`` px images goes through ``arch`` (traced on the meta device), else the error."""
    net = _meta_model(arch)
    try:
        with torch.no_grad():
            net(torch.empty(2, 3, res, res, device="meta"))
    except Exception as err:  # whatever timm raises for a size it cannot take
        text = str(err).strip().splitlines()
        return f"{type(err).__name__}: {text[0]}" if text and text[0] else type(err).__name__
    return None


@functools.lru_cache(maxsize=8)
def _meta_model(arch: str) -> nn.Module:
    from fgvc.models.registry import model_spec

    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # an init that draws numbers leaves no trace
        net = model_spec(arch).build(2)
    return net.eval()
