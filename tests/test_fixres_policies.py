"""FixRes stage-2 policies: exactly which parameters learn and which modules run in train mode."""

from __future__ import annotations

import re
from typing import get_args

import pytest
import torch
from torch import nn

from fgvc.config import Tune as ConfigTune
from fgvc.errors import ConfigError
from fgvc.models import TUNE_POLICIES, create_model, set_train_mode, set_trainable, trainable_parameters

RESNET50_LAYER4_PARAMS = 14_964_736  # torchvision/timm ResNet-50 layer4, as printed by any model summary


pytestmark = pytest.mark.usefixtures("one_thread")  # single-threaded torch: see conftest.py


def on_meta(name: str, num_classes: int = 10) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, num_classes)


def trainable_names(model: nn.Module, tune: str) -> set[str]:
    chosen = {id(p) for p in trainable_parameters(model, tune)}
    return {name for name, p in model.named_parameters() if id(p) in chosen}


def requires_grad_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def train_mode_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if module.training}


def subtree(model: nn.Module, *roots: str) -> set[str]:
    return {name for name, _ in model.named_modules() if any(name == r or name.startswith(r + ".") for r in roots)}


def params_under(model: nn.Module, *roots: str) -> set[str]:
    return {name for name, _ in model.named_parameters() if any(name.startswith(r + ".") for r in roots)}


def test_policies_are_the_config_values():
    assert set(TUNE_POLICIES) == set(get_args(ConfigTune))


FC = {"fc.weight", "fc.bias"}
BN = {"layer4.2.bn3.weight", "layer4.2.bn3.bias"}


@pytest.mark.parametrize(
    ("tune", "learning", "in_train_mode"),
    [
        ("fc", FC, set()),
        ("bn+fc", FC | BN, {"layer4.2.bn3"}),
        ("bnstats+fc", FC, {"layer4.2.bn3"}),
        ("bnstats", set(), {"layer4.2.bn3"}),
    ],
)
def test_resnet50_stage2_policies(tune, learning, in_train_mode):
    model = on_meta("resnet50")
    assert set_trainable(model, tune) == trainable_parameters(model, tune)
    assert requires_grad_names(model) == trainable_names(model, tune) == learning
    model.train()  # whatever the engine did before, set_train_mode decides
    set_train_mode(model, tune)
    assert train_mode_names(model) == in_train_mode


def test_resnet50_stage_policy_trains_layer4_bn_and_classifier():
    model = on_meta("resnet50")
    set_trainable(model, "stage+bn+fc")
    assert requires_grad_names(model) == params_under(model, "layer4") | FC
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == RESNET50_LAYER4_PARAMS + 2048 * 10 + 10
    set_train_mode(model, "stage+bn+fc")
    assert train_mode_names(model) == subtree(model, "layer4")
    assert not model.fc.training and not model.training


def test_all_trains_everything_and_undoes_a_stage2_policy():
    model = on_meta("resnet50")
    set_trainable(model, "fc")
    set_train_mode(model, "fc")
    set_trainable(model, "all")
    set_train_mode(model, "all")
    assert requires_grad_names(model) == {name for name, _ in model.named_parameters()}
    assert train_mode_names(model) == {name for name, _ in model.named_modules()}


def test_trainable_parameters_has_no_side_effects():
    model = on_meta("resnet50")
    set_trainable(model, "fc")
    before = requires_grad_names(model)
    assert len(trainable_parameters(model, "all")) == len(list(model.parameters()))
    assert requires_grad_names(model) == before == FC


def test_pnasnet_stage_policy_is_its_last_three_cells():
    model = on_meta("pnasnet5large")
    set_trainable(model, "stage+bn+fc")
    head = {"last_linear.weight", "last_linear.bias"}
    assert requires_grad_names(model) == params_under(model, "cell_9", "cell_10", "cell_11") | head
    set_train_mode(model, "stage+bn+fc")
    assert train_mode_names(model) == subtree(model, "cell_9", "cell_10", "cell_11")


def test_senet154_bn_policy_is_the_last_bottleneck_bn3():
    model = on_meta("senet154")
    set_trainable(model, "bn+fc")
    expected = {"layer4.2.bn3.weight", "layer4.2.bn3.bias", "last_linear.weight", "last_linear.bias"}
    assert requires_grad_names(model) == expected
    set_train_mode(model, "bn+fc")
    assert train_mode_names(model) == {"layer4.2.bn3"}  # the head Dropout stays in eval mode


def test_models_without_batchnorm_refuse_bn_policies_but_tune_stage_and_fc():
    model = on_meta("timm:convnext_atto")
    for tune in ("bn+fc", "bnstats+fc", "bnstats"):
        expected = rf"tune '{re.escape(tune)}' needs a BatchNorm.*timm:convnext_atto has none"
        with pytest.raises(ConfigError, match=expected):
            set_trainable(model, tune)
    assert trainable_names(model, "fc") == {"head.fc.weight", "head.fc.bias"}
    assert trainable_names(model, "stage+bn+fc") == params_under(model, "stages.3", "head")
    set_train_mode(model, "stage+bn+fc")
    assert train_mode_names(model) == subtree(model, "stages.3", "head") - {"head.fc"}


def test_unknown_policy_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown tune policy 'bn'; choose one of all, fc, bn\+fc"):
        set_trainable(on_meta("resnet50"), "bn")


def test_policies_work_through_a_data_parallel_wrapper():
    model = on_meta("resnet50")
    wrapped = nn.DataParallel(model)
    set_trainable(wrapped, "bn+fc")
    set_train_mode(wrapped, "bn+fc")
    assert requires_grad_names(model) == FC | BN
    assert train_mode_names(model) == {"layer4.2.bn3"} and not wrapped.training


# --- behaviour on real tensors ---------------------------------------------------------------------------------------


def bn_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: torch.cat([m.running_mean, m.running_var]).clone()
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    }


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    torch.manual_seed(0)
    return create_model("timm:tf_efficientnet_lite0", 4)


def test_bn_fc_backward_reaches_only_the_last_bn_and_classifier(lite0):
    set_trainable(lite0, "bn+fc")
    set_train_mode(lite0, "bn+fc")
    lite0.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(lite0(torch.randn(2, 3, 96, 96)), torch.tensor([0, 3])).backward()
    with_grad = {name for name, p in lite0.named_parameters() if p.grad is not None}
    assert with_grad == {"bn2.weight", "bn2.bias", "classifier.weight", "classifier.bias"}


@pytest.mark.parametrize(("tune", "updated"), [("bnstats+fc", {"bn2"}), ("bnstats", {"bn2"}), ("fc", set())])
def test_only_the_last_bn_reestimates_running_statistics(lite0, tune, updated):
    set_trainable(lite0, tune)
    set_train_mode(lite0, tune)
    before = bn_statistics(lite0)
    with torch.no_grad():
        lite0(torch.randn(2, 3, 128, 128) * 3 + 1)
    after = bn_statistics(lite0)
    assert {name for name in before if not torch.equal(before[name], after[name])} == updated
    assert not any(p.requires_grad for p in lite0.bn2.parameters())  # affine frozen, only statistics move


def test_stage2_switches_off_inception_resnet_v2_functional_dropout():
    torch.manual_seed(0)
    model = create_model("inceptionresnetv2", 5)  # its logits() call F.dropout(p=0.5, training=self.training)
    x = torch.randn(2, 3, 80, 80)
    set_train_mode(model, "bn+fc")
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        set_train_mode(model, "all")
        assert not torch.equal(model(x), model(x))
