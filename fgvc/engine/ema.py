"""An exponential moving average of the weights during stage 1 (``stage1.ema_decay``, ``fgvc stage1 --ema-decay``).

Why: the average of the last few hundred optimiser steps generalises a little better than the weights of the last
step, at the cost of one more copy of the weights on the device. timm's :class:`ModelEmaV3` does the averaging
(parameters and BN statistics, one fused update per step), always with its warm-up: the decay at update n (from 1)
is ``min(ema_decay, 1 - n^(-2/3))``, 0 at the first (a copy), so the average never holds much of the random head of
the first steps, even on a fine-grained dataset whose whole run is a few thousand steps (timm's
``--model-ema-warmup``). The warm-up's decay reaches 0.99 at 1,000 steps, 0.997 at 6,000 and 0.9998 at 354,000:
``ema_decay`` caps it only in long runs (iNat at scale); below that it is an on/off switch.

Cost: one more copy of the weights on the device, and per step two ``state_dict()`` walks in timm's update (about
10 ms of host time for InceptionResNet-V2's 1,306 tensors on a 2-CPU machine), which the device's step hides unless
the host sets the pace.

Where it is on, the average *is* the stage's model: it is validated, best.pt holds it, and stage 2, ``predict`` and
``sweep`` read it from the checkpoint's ``model`` entry as they read any model. ``last.pt`` keeps the optimiser's own
weights beside it (``trained``), with the number of updates, so that a resumed run goes on averaging where it stopped.
"""

from __future__ import annotations

import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn


class WeightAverage:
    """The moving average of ``model``'s weights, updated after each optimiser step by :meth:`update`."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model = model
        self._ema = ModelEmaV3(model, decay=decay, use_warmup=True)
        self._ema.module.requires_grad_(False)
        self.updates = 0  # optimiser steps averaged so far: the warm-up's n

    @property
    def module(self) -> nn.Module:
        """The averaged model (always in eval mode): what is validated and saved."""
        return self._ema.module

    def update(self) -> None:
        self.updates += 1
        self._ema.update(self.model, step=self.updates)

    def load(self, state_dict: dict[str, torch.Tensor], updates: int) -> None:
        """Continue the average saved in a checkpoint (``model``, and ``ema_updates``)."""
        self.module.load_state_dict(state_dict)
        self.updates = updates
