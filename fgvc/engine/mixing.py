"""Mixup / CutMix for stage 1: timm's ``Mixup`` on the normalised device batch, with soft targets.

timm's ``Mixup`` pairs each image with its mirror in the batch and needs an even batch; a batch left odd by skipped
unreadable images (or a short last batch) mixes all but its last image, which keeps its own (smoothed) label.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.data.mixup import Mixup, mixup_target
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from fgvc.config import StageConfig

Mix = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def build_mixing(stage: StageConfig, num_classes: int) -> tuple[Mix | None, nn.Module]:
    """The batch mixer (None when ``mixup`` and ``cutmix`` are 0) and the loss its targets need."""
    if not (stage.mixup or stage.cutmix):
        return None, nn.CrossEntropyLoss(label_smoothing=stage.label_smoothing)
    mixer = Mixup(mixup_alpha=stage.mixup, cutmix_alpha=stage.cutmix, label_smoothing=stage.label_smoothing,
                  num_classes=num_classes)  # fmt: skip

    def mix(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        paired = len(images) - len(images) % 2
        if paired == len(images):
            return mixer(images, labels)
        last = mixup_target(labels[paired:], num_classes, smoothing=stage.label_smoothing)
        if not paired:
            return images, last
        mixed, targets = mixer(images[:paired], labels[:paired])  # in place: ``images`` now holds the mixed pairs
        return torch.cat([mixed, images[paired:]]), torch.cat([targets, last])

    return mix, SoftTargetCrossEntropy()
