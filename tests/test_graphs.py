"""fgvc.engine.graphs: the CUDA-graph inference forward, when it captures and replays, and its eager fallbacks.

The CUDA tests run where a GPU is (``benchmarks/run_on_gpu.sh`` runs this file first); on the CPU only the pass-through
is checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from fgvc.data import OnDeviceNormalize
from fgvc.engine.graphs import AGREEMENT_TOLERANCE, GraphedInference
from fgvc.models import create_model, get_meta

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/run_on_gpu.sh)")


def test_cpu_inputs_run_the_model_itself() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    wrapped = GraphedInference(model, None)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for _ in range(3):  # a shape that repeats would be captured on CUDA
            assert torch.equal(wrapped(x), model(x))
    assert not wrapped.captured and wrapped.replays == 0 and wrapped.eager_reason is None
    assert list(wrapped.state_dict()) == [f"model.{key}" for key in model.state_dict()]  # nothing of its own to save


def _cuda_batches(count: int, size: int = 6) -> tuple[nn.Module, list[torch.Tensor]]:
    """A timm test model in eval mode on CUDA, channels last, and ``count`` normalised random batches for it."""
    torch.manual_seed(0)
    model = create_model("timm:test_resnet", 7, None).cuda().to(memory_format=torch.channels_last).eval()
    meta = get_meta(model)
    prepare = OnDeviceNormalize(meta.mean, meta.std, torch.device("cuda"), True)
    return model, [prepare(torch.randint(0, 256, (size, 3, 48, 48), dtype=torch.uint8)) for _ in range(count)]


def _probabilities_differ(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.softmax(a.float(), 1) - torch.softmax(b.float(), 1)).abs().max().item()


@needs_cuda
def test_on_cuda_a_repeated_shape_is_captured_then_replayed_and_agrees_with_the_model() -> None:
    model, batches = _cuda_batches(5)
    _, [short] = _cuda_batches(1, size=2)
    wrapped = GraphedInference(model, torch.bfloat16)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = [wrapped(x) for x in [*batches, short]]
        eager = [model(x) for x in [*batches, short]]
        assert wrapped.captured and wrapped.eager_reason is None
        # seen, captured (both eager), then replayed (the first one checked against the eager forward); short: eager
        assert wrapped.replays == 3
        for got, want in zip(outputs, eager, strict=True):  # each output kept its own values after later replays
            assert _probabilities_differ(got, want) <= AGREEMENT_TOLERANCE
        assert not torch.equal(outputs[3], outputs[4])  # copied out, not the graph's one output buffer twice
        with torch.enable_grad():  # gradients on: never replayed
            assert wrapped(batches[0]).requires_grad
        wrapped.train()
        wrapped(batches[0])  # training mode: never replayed either
        wrapped.eval()
        assert wrapped.replays == 3
        wrapped(batches[0])
        assert wrapped.replays == 4


class _NanGraph:
    """Stands in for a captured graph whose replay goes wrong: it fills the output with NaN."""

    def __init__(self, out: torch.Tensor) -> None:
        self.out = out

    def replay(self) -> None:
        self.out.fill_(float("nan"))


@needs_cuda
def test_on_cuda_a_replay_that_disagrees_is_dropped_for_the_eager_forward(fgvc_log: pytest.LogCaptureFixture) -> None:
    model, batches = _cuda_batches(4)
    wrapped = GraphedInference(model, None)
    with torch.no_grad():
        wrapped(batches[0]), wrapped(batches[1])  # seen, captured
        assert wrapped._captured is not None
        wrapped._captured.graph = _NanGraph(wrapped._captured.static_out)  # type: ignore[assignment]
        checked, after = wrapped(batches[2]), wrapped(batches[3])
        assert torch.allclose(checked, model(batches[2]), atol=1e-5)  # the eager output, not the replay's NaN
        assert torch.allclose(after, model(batches[3]), atol=1e-5)
    assert not wrapped.captured and wrapped.replays == 1  # the one checked, then given up
    assert wrapped.eager_reason is not None and "differ from the eager forward's by nan" in wrapped.eager_reason
    assert "CUDA graph for ResNet not used" in fgvc_log.text


@needs_cuda
def test_on_cuda_capture_beside_the_decoding_thread_agrees_with_the_model(tmp_path: Path) -> None:
    """``decode: gpu`` prediction: the Prefetcher's thread runs nvJPEG and the crops on streams of its own while the
    main thread captures and replays (capture_error_mode="thread_local" lets the other thread's CUDA calls proceed).
    Every output matches the eager model's on the same prepared batch."""
    import cv2
    import numpy as np
    import pandas as pd

    from fgvc.gpu_decode import EncodedImageDataset, GpuBatchPreparer, collate_encoded, gpu_decode_available
    from fgvc.prefetch import Prefetcher, wait_prepared

    cuda = torch.device("cuda")
    if not gpu_decode_available(cuda):
        pytest.skip("this torchvision cannot decode JPEGs on the device")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(48):
        path = tmp_path / f"{i}.jpg"
        cv2.imwrite(str(path), rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
        paths.append(str(path))
    dataset = EncodedImageDataset(pd.DataFrame({"path": paths, "label": 0}))
    batches = [collate_encoded([dataset[(i, i)] for i in range(start, start + 6)]) for start in range(0, 48, 6)]
    model, _ = _cuda_batches(0)
    meta = get_meta(model)
    wrapped = GraphedInference(model, torch.bfloat16)
    prepare = GpuBatchPreparer("test", 48, meta.mean, meta.std, cuda)
    inputs, outputs = [], []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for prepared, _labels, _rows in Prefetcher(batches, prepare, cuda):
            x = wait_prepared(prepared)
            outputs.append(wrapped(x))
            inputs.append(x.clone())
        eager = [model(x) for x in inputs]
    assert wrapped.captured and wrapped.eager_reason is None
    assert wrapped.replays == len(batches) - 2  # seen, captured, then every later batch replayed
    for got, want in zip(outputs, eager, strict=True):
        assert _probabilities_differ(got, want) <= AGREEMENT_TOLERANCE


@needs_cuda
def test_on_cuda_a_forward_that_cannot_be_captured_is_a_one_line_error() -> None:
    """A forward that reads a value back to the host cannot be captured. Run in its own process: a failed capture
    leaves PyTorch's caching allocator in capture mode for the rest of the process."""
    script = textwrap.dedent(
        """
        import torch
        from torch import nn
        from fgvc.engine.graphs import GraphedInference
        from fgvc.errors import ConfigError

        class SyncsOnTheHost(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 3)

            def forward(self, x):
                return self.fc(x / (float(x.abs().max().item()) or 1.0))

        wrapped = GraphedInference(SyncsOnTheHost().cuda().eval(), None)
        x = torch.randn(5, 4, device="cuda")
        with torch.no_grad():
            wrapped(x)  # seen once: eager
            try:
                wrapped(x)  # seen twice: captured
            except ConfigError as err:
                print("ConfigError:", err)
            else:
                print("no error")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ConfigError: runtime.cuda_graph: SyncsOnTheHost's forward cannot")
    assert lines[0].endswith("predict with --no-cuda-graph (runtime.cuda_graph: false)")
    assert "previous error during capture" not in lines[0]  # the cause, not the capture's end reporting it


def test_a_failed_capture_is_reported_by_its_first_cause() -> None:
    from fgvc.engine.graphs import _first_cause

    try:
        try:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture") from None
    except RuntimeError as err:
        assert err.__cause__ is None and err.__context__ is not None
        assert _first_cause(err) == "operation not permitted when stream is capturing"
    assert _first_cause(ValueError()) == "ValueError"
