"""Model zoo, offline ImageNet weights and FixRes freezing policies (see registry, weights, fixres)."""

from __future__ import annotations

from fgvc.models.checks import check_resolution
from fgvc.models.fixres import TUNE_POLICIES, Tune, check_policy, set_train_mode, set_trainable, trainable_parameters
from fgvc.models.meta import ModelMeta, get_meta, rgb, set_meta, unwrap_model
from fgvc.models.registry import (
    EXAMPLE_TIMM_MODELS,
    REGISTRY,
    count_parameters,
    create_model,
    expected_weights_file,
    find_imagenet_weights,
    last_batchnorm,
    list_models,
    model_meta,
    weights_file,
)
from fgvc.models.weights import load_weights, read_state_dict

__all__ = [
    "EXAMPLE_TIMM_MODELS",
    "REGISTRY",
    "TUNE_POLICIES",
    "ModelMeta",
    "Tune",
    "check_policy",
    "check_resolution",
    "count_parameters",
    "create_model",
    "expected_weights_file",
    "find_imagenet_weights",
    "get_meta",
    "last_batchnorm",
    "list_models",
    "load_weights",
    "model_meta",
    "read_state_dict",
    "rgb",
    "set_meta",
    "set_train_mode",
    "set_trainable",
    "trainable_parameters",
    "unwrap_model",
    "weights_file",
]
