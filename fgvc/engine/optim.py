"""The optimiser and the per-step learning-rate schedule both stages train with."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fgvc.config import StageConfig


def build_scheduler(
    optimizer: torch.optim.Optimizer, stage: StageConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warmup to the peak, reached on the first step after it (a fractional warmup rounds up
    to whole steps, so 0.1 epoch is never none), then cosine / step (/10 every ``step_epochs``) / constant."""
    total = max(1, stage.epochs * steps_per_epoch)
    warmup = math.ceil(stage.warmup_epochs * steps_per_epoch - 1e-9)  # 0.3 * 10 is 3.0000000000000004

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if stage.sched == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if stage.sched == "step":
            return 0.1 ** ((step // steps_per_epoch) // stage.step_epochs)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(model: nn.Module, stage: StageConfig, lr: float) -> torch.optim.Optimizer | None:
    """SGD with momentum (the paper) or AdamW over the trainable parameters; no weight decay on biases and norms."""
    if not any(p.requires_grad for p in model.parameters()):
        return None
    import timm.optim

    name = "momentum" if stage.opt == "sgd" else "adamw"  # timm's "sgd" is Nesterov; the paper uses plain momentum
    kwargs: dict[str, Any] = {"momentum": stage.momentum} if stage.opt == "sgd" else {}
    return timm.optim.create_optimizer_v2(model, opt=name, lr=lr, weight_decay=stage.weight_decay, **kwargs)
