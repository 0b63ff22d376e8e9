"""FixRes freezing policies: which parameters learn and which modules run in train mode, per ``tune`` value.

Stage 1 (``all``) trains everything. Stage 2 adapts to the test resolution with the trunk frozen: the whole model is
in eval mode and only the tuned modules are switched to train mode, so that the last BatchNorm re-estimates its
running statistics at the new resolution while every other BatchNorm keeps ImageNet/stage-1 statistics.

Choices made here (the engine relies on them):

* The classifier stays in eval mode in stage 2 (its parameters still learn). Train mode only changes BatchNorm and
  dropout; stage 2 should see the network as it will be evaluated, and the models' head dropout (SENet-154,
  PNASNet, timm's ``drop_rate``, Inception-ResNet-V2's functional dropout which follows the top-level flag) would
  only add noise to a few epochs of fine-tuning.
* ``bnstats+fc`` and ``bnstats`` follow the public FixRes code: the BatchNorm affine weights are frozen and only its
  running statistics change (train mode). ``bn+fc`` follows the paper: the affine weights learn too.
* ``stage+bn+fc`` puts the whole last stage (``ModelMeta.last_stage``) in train mode, BatchNorms and any dropout or
  drop-path inside it included, as the "Layer 4" rows of the paper's Table 10.
* ``bnstats`` has no trainable parameter at all: the engine should run forward passes without an optimizer step.
"""

from __future__ import annotations

from typing import get_args

from torch import nn

from fgvc.config import Tune
from fgvc.errors import ConfigError
from fgvc.models.meta import ModelMeta, get_meta, unwrap_model

TUNE_POLICIES: tuple[str, ...] = get_args(Tune)
_NEEDS_BN = ("bn+fc", "bnstats+fc", "bnstats")


def check_policy(meta: ModelMeta, tune: str) -> None:
    """A :class:`ConfigError` if ``tune`` cannot apply to ``meta``'s architecture."""
    if tune not in TUNE_POLICIES:
        raise ConfigError(f"unknown tune policy '{tune}'; choose one of {', '.join(TUNE_POLICIES)}")
    if tune in _NEEDS_BN and meta.last_bn is None:
        raise ConfigError(
            f"tune '{tune}' needs a BatchNorm that normalises the pooled features, and {meta.arch} has none (no "
            "BatchNorm, LayerNorm after it, or it covers one branch only); use 'stage+bn+fc' or 'fc'"
        )
    if tune == "stage+bn+fc" and not meta.last_stage:
        raise ConfigError(f"tune 'stage+bn+fc': fgvc does not know the last stage of {meta.arch}; use 'bn+fc' or 'fc'")


def _bn(meta: ModelMeta) -> list[str]:
    return [meta.last_bn] if meta.last_bn else []


def _learning_modules(meta: ModelMeta, tune: str) -> list[str]:
    """Module names whose parameters learn; "" is the whole model."""
    return {
        "all": [""],
        "fc": [meta.classifier],
        "bn+fc": [*_bn(meta), meta.classifier],
        "bnstats+fc": [meta.classifier],
        "stage+bn+fc": [*meta.last_stage, *_bn(meta), meta.classifier],
        "bnstats": [],
    }[tune]


def _train_mode_modules(meta: ModelMeta, tune: str) -> list[str]:
    """Module names put in train mode (with everything below them) after ``model.eval()``."""
    return {
        "all": [""],
        "fc": [],
        "bn+fc": _bn(meta),
        "bnstats+fc": _bn(meta),
        "stage+bn+fc": [*meta.last_stage, *_bn(meta)],
        "bnstats": _bn(meta),
    }[tune]


def _under(name: str, prefixes: list[str]) -> bool:
    return any(prefix == "" or name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def trainable_parameters(model: nn.Module, tune: str) -> list[nn.Parameter]:
    """The parameters that learn under ``tune``, in ``named_parameters()`` order. No side effects: ``requires_grad``
    is left as it is (see :func:`set_trainable`)."""
    meta = get_meta(model)
    check_policy(meta, tune)
    learning = _learning_modules(meta, tune)
    return [p for name, p in unwrap_model(model).named_parameters() if _under(name, learning)]


def set_trainable(model: nn.Module, tune: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` to True exactly for :func:`trainable_parameters` (False elsewhere) and return them."""
    chosen = trainable_parameters(model, tune)
    chosen_ids = {id(p) for p in chosen}
    for p in unwrap_model(model).parameters():
        p.requires_grad_(id(p) in chosen_ids)
    return chosen


def set_train_mode(model: nn.Module, tune: str) -> None:
    """Put the model in the train/eval mix of ``tune``; call at the start of every training epoch.

    ``all``: ``model.train()``. Stage-2 policies: ``model.eval()``, then the last BatchNorm (all but ``fc``) and, for
    ``stage+bn+fc``, the last stage back in train mode; the classifier stays in eval mode (see the module docstring).
    """
    meta = get_meta(model)
    check_policy(meta, tune)
    if tune == "all":
        model.train()
        return
    model.eval()
    net = unwrap_model(model)
    for name in _train_mode_modules(meta, tune):
        net.get_submodule(name).train()
    net.get_submodule(meta.classifier).eval()
