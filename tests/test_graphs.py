"""fgvc.engine.graphs: the CUDA-graph inference forward, its eager fallbacks, and its agreement with the model.

The CUDA tests run where a GPU is (``benchmarks/run_on_gpu.sh`` runs this file first); on the CPU only the pass-through
is checked.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fgvc.data import OnDeviceNormalize
from fgvc.engine.graphs import AGREEMENT_TOLERANCE, GraphedInference
from fgvc.models import create_model, get_meta

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/run_on_gpu.sh)")


def test_cpu_inputs_run_the_model_itself() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    wrapped = GraphedInference(model, None)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(wrapped(x), model(x))
    assert not wrapped.captured and wrapped.eager_reason is None
    assert list(wrapped.state_dict()) == [f"model.{key}" for key in model.state_dict()]  # nothing of its own to save


def _timm_model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("timm:test_resnet", 7, None).cuda().to(memory_format=torch.channels_last).eval()


@needs_cuda
def test_on_cuda_replays_agree_with_the_eager_model_and_other_shapes_run_eagerly() -> None:
    model = _timm_model()
    meta = get_meta(model)
    prepare = OnDeviceNormalize(meta.mean, meta.std, torch.device("cuda"), True)
    wrapped = GraphedInference(model, torch.bfloat16)
    batches = [prepare(torch.randint(0, 256, (6, 3, 48, 48), dtype=torch.uint8)) for _ in range(3)]
    short = prepare(torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8))
    outputs = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for x in [*batches, short]:
            outputs.append(wrapped(x))
        eager = [model(x) for x in [*batches, short]]
    assert wrapped.captured and wrapped.eager_reason is None
    for got, want in zip(outputs, eager, strict=True):  # each output kept its own values after later replays
        difference = (torch.softmax(got.float(), 1) - torch.softmax(want.float(), 1)).abs().max().item()
        assert difference <= AGREEMENT_TOLERANCE
    assert not torch.equal(outputs[1], outputs[2])  # copied out, not the graph's one output buffer twice
    with torch.enable_grad():  # training (gradients on) never replays
        assert wrapped(batches[0]).requires_grad


class _SyncsOnTheHost(nn.Module):
    """A forward that reads a value back to the host, which a CUDA graph capture cannot contain."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = float(x.abs().max().item()) or 1.0
        return self.fc(x / scale)


@needs_cuda
def test_on_cuda_a_capture_that_fails_leaves_the_forward_eager(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = _SyncsOnTheHost().cuda().eval()
    wrapped = GraphedInference(model, None)
    x = torch.randn(5, 4, device="cuda")
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="fgvc.engine.graphs"):
        first, second = wrapped(x), wrapped(x * 2)
        expected = model(x), model(x * 2)
    assert not wrapped.captured and wrapped.eager_reason is not None
    assert wrapped.eager_reason.startswith("capture failed")
    assert "CUDA graph for _SyncsOnTheHost not used: capture failed" in caplog.text
    assert torch.equal(first, expected[0]) and torch.equal(second, expected[1])  # the device works on after it
