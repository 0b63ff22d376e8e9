"""fgvc.engine.graphs: the CUDA-graph inference forward, when it captures and replays, and its eager fallbacks.

The CUDA tests run where a GPU is (``benchmarks/run_on_gpu.sh`` runs this file first); on the CPU only the pass-through
is checked.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from fgvc.data import OnDeviceNormalize
from fgvc.engine.graphs import AGREEMENT_TOLERANCE, GraphedInference, GraphedTraining
from fgvc.engine.loop import optimizer_step, train_one_epoch
from fgvc.engine.runtime import Runtime
from fgvc.models import create_model, get_meta, set_train_mode, set_trainable

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


def _encoded_batches(folder: Path) -> list[tuple]:
    """Eight loader batches of six 80x60 JPEGs (labels 0-6), as ``decode: gpu`` loader workers ship them; skips the
    test where this torchvision cannot decode JPEGs on the device."""
    import cv2
    import numpy as np
    import pandas as pd

    from fgvc.gpu_decode import EncodedImageDataset, collate_encoded, gpu_decode_available

    if not gpu_decode_available(torch.device("cuda")):
        pytest.skip("this torchvision cannot decode JPEGs on the device")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(48):
        path = folder / f"{i}.jpg"
        cv2.imwrite(str(path), rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
        paths.append(str(path))
    dataset = EncodedImageDataset(pd.DataFrame({"path": paths, "label": [i % 7 for i in range(48)]}))
    return [collate_encoded([dataset[(i, i)] for i in range(start, start + 6)]) for start in range(0, 48, 6)]


@needs_cuda
def test_on_cuda_capture_beside_the_decoding_thread_agrees_with_the_model(tmp_path: Path) -> None:
    """``decode: gpu`` prediction: the Prefetcher's thread runs nvJPEG and the crops on streams of its own while the
    main thread captures and replays (capture_error_mode="thread_local" lets the other thread's CUDA calls proceed).
    Every output matches the eager model's on the same prepared batch."""
    from fgvc.gpu_decode import GpuBatchPreparer
    from fgvc.prefetch import Prefetcher, wait_prepared

    cuda = torch.device("cuda")
    batches = _encoded_batches(tmp_path)
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


_SYNCS_ON_THE_HOST = """
import torch
from torch import nn
from fgvc.engine.graphs import GraphedInference, GraphedTraining
from fgvc.errors import ConfigError

class SyncsOnTheHost(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x / (float(x.abs().max().item()) or 1.0))

wrapped = {wrapped}
x = torch.randn(5, 4, device="{device}")
try:
    for _ in range(2):  # seen once: eager; seen twice: captured
        {step}
except ConfigError as err:
    print("ConfigError:", err)
else:
    print("no error")
"""


def _uncapturable(wrapped: str, step: str, device: str = "cuda") -> str:
    """What a script prints that captures a module reading a value back to the host: the ConfigError's one line. In a
    process of its own: a failed capture leaves PyTorch's caching allocator in capture mode for the rest of it."""
    script = _SYNCS_ON_THE_HOST.format(wrapped=wrapped, step=step, device=device)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, lines
    assert "previous error during capture" not in lines[0]  # the cause, not the capture's end reporting it
    return lines[0]


@needs_cuda
def test_on_cuda_a_forward_that_cannot_be_captured_is_a_one_line_error() -> None:
    line = _uncapturable("GraphedInference(SyncsOnTheHost().cuda().eval(), None)",
                         "with torch.no_grad(): wrapped(x)")  # fmt: skip
    assert line.startswith("ConfigError: runtime.cuda_graph: SyncsOnTheHost's forward cannot")
    assert line.endswith("predict with --no-cuda-graph (runtime.cuda_graph: false)")


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


# ---------------------------------------------------------------------------------------------------------------------
# GraphedTraining: each training step's forward and backward replayed from CUDA graphs


def _trainer_inputs(device: str, batches: int, size: int = 6, short: bool = False) -> list[tuple]:
    """Loader batches as ``train_one_epoch`` reads them: (uint8 images, labels, dataset rows); a last short one."""
    generator = torch.Generator().manual_seed(1)
    sizes = [size] * batches + ([2] if short else [])
    return [
        (torch.randint(0, 256, (n, 3, 48, 48), dtype=torch.uint8, generator=generator),
         torch.randint(0, 7, (n,), generator=generator), torch.arange(n))
        for n in sizes
    ]  # fmt: skip


def _train(net: nn.Module, model: nn.Module, batches: list[tuple], rt: Runtime, tune: str = "all") -> float:
    """``batches`` through fgvc's own training loop and optimiser step (SGD with momentum): the epoch's mean loss."""
    set_trainable(model, tune)
    set_train_mode(model, tune)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    meta = get_meta(model)
    prepare = OnDeviceNormalize(meta.mean, meta.std, rt.device, rt.channels_last)
    stats = train_one_epoch(net, batches, optimizer, None, None, rt, prepare, nn.CrossEntropyLoss(), progress=False)
    return stats.loss


def _states_differ(a: nn.Module, b: nn.Module, counters: bool = True) -> float:
    """Largest absolute difference between two models' parameters and buffers (BatchNorm statistics included, and
    their step counters unless ``counters`` is False: a warm-up forward that moved the statistics also counts)."""
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if counters or sa[k].is_floating_point()]
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in keys)


@pytest.fixture
def deterministic_cudnn() -> Iterator[None]:
    """cuDNN's deterministic kernels for an eager run compared with a replayed one: otherwise a weight gradient may be
    summed in another order each run, and seven steps at lr 0.05 with momentum grow that into a difference of ~0.04
    (measured on the CPU with gradients perturbed by 1e-6), above the tolerance the comparison can afford."""
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        yield


class _EagerGraphs:
    """Stands in on the CPU for the two captured graphs: "replaying" them runs the model's forward and its backward
    eagerly between the same static tensors, so that ``_Step``'s plumbing (the copies in and out, which gradient
    reaches which parameter, autograd adopting them, the optimiser step after) is checked without a GPU."""

    def __init__(self, model: nn.Module, example: torch.Tensor, classes: int) -> None:
        from fgvc.engine.graphs import _TrainingCapture

        params = tuple(p for p in model.parameters() if p.requires_grad)
        live: dict[str, torch.Tensor] = {}
        static_in = example.clone()
        static_out = torch.empty(len(example), classes)
        static_grad_out = torch.empty_like(static_out)
        static_grads = tuple(torch.empty_like(p) for p in params)

        class Forward:
            def replay(self) -> None:
                with torch.enable_grad():
                    live["out"] = model(static_in)
                static_out.copy_(live["out"].detach())

        class Backward:
            def replay(self) -> None:
                grads = torch.autograd.grad(live.pop("out"), params, static_grad_out)
                for static, grad in zip(static_grads, grads, strict=True):
                    static.copy_(grad)

        self.capture = _TrainingCapture(Forward(), Backward(), static_in, static_out, static_grad_out,  # type: ignore[arg-type]
                                        static_grads, params, key=())  # fmt: skip


class _Replaying(nn.Module):
    def __init__(self, model: nn.Module, capture: object) -> None:
        super().__init__()
        self.model, self.capture = model, capture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fgvc.engine.graphs import _Step

        return _Step.apply(self.capture, x, *self.capture.params)  # type: ignore[attr-defined]


def test_a_replayed_step_trains_the_model_as_the_eager_step_does() -> None:
    """``_Step`` with graphs that compute eagerly: three optimiser steps of fgvc's loop leave the same parameters and
    BatchNorm statistics as the eager model's, and the same mean loss."""
    torch.manual_seed(0)
    eager = create_model("timm:test_resnet", 7, None)
    replayed = copy.deepcopy(eager)
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    batches = _trainer_inputs("cpu", 3)
    loss_eager = _train(eager, eager, batches, rt)
    example = torch.zeros(6, 3, 48, 48)
    net = _Replaying(replayed, _EagerGraphs(replayed, example, 7).capture)
    loss_replayed = _train(net, replayed, batches, rt)
    assert abs(loss_eager - loss_replayed) < 1e-5
    assert _states_differ(eager, replayed) < 1e-5
    assert _states_differ(eager, create_model("timm:test_resnet", 7, None)) > 1e-3  # it did train


def test_a_backward_after_another_forward_is_refused() -> None:
    """The backward graph reads the activations the last forward replay left: a backward whose forward is not the
    last one would compute another batch's gradients, silently."""
    torch.manual_seed(0)
    model = create_model("timm:test_resnet", 7, None)
    x = torch.randn(6, 3, 48, 48)
    net = _Replaying(model, _EagerGraphs(model, x, 7).capture)
    first = net(x).sum()
    net(x).sum().backward()  # its own forward was the last: fine
    with pytest.raises(RuntimeError, match="a backward must follow its own forward"):
        first.backward()


def test_the_capture_check_compares_probabilities_and_every_gradient() -> None:
    from fgvc.engine.graphs import GRADIENT_TOLERANCE, _disagreement

    torch.manual_seed(0)
    out, grads = torch.randn(4, 7), [torch.randn(3, 3), None, torch.randn(5)]
    assert _disagreement(out, out.clone(), grads, [g.clone() if g is not None else None for g in grads]) == ""
    stale = [grads[0], None, grads[2] * (1 + 2 * GRADIENT_TOLERANCE)]  # one small gradient off: not hidden by the rest
    expected = f"a gradient differs from the eager backward's by {2 * GRADIENT_TOLERANCE:.1e} of its norm"
    assert expected in _disagreement(out, out, stale, grads)
    nan = [grads[0], None, torch.full((5,), float("nan"))]
    assert "a gradient differs" in _disagreement(out, out, nan, grads)
    assert "probabilities differ" in _disagreement(out + torch.eye(4, 7) * 5, out, grads, grads)
    # a gradient that is zero in theory comes out as rounding noise on both sides: not a disagreement
    noise = [grads[0], None, torch.full((5,), 1e-7)]
    assert _disagreement(out, out, noise, [grads[0], None, torch.zeros(5)]) == ""


class _InertGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: the "capture" runs eagerly once, and a replay does nothing."""

    def replay(self) -> None:
        pass


@pytest.mark.parametrize(
    ("drop_rate", "caught"),
    [(0.0, "a gradient differs from the eager backward's"), (0.5, "its probabilities differ from the eager forward's")],
)
def test_the_capture_catches_graphs_that_do_not_recompute_and_leaves_the_model_as_it_found_it(
    monkeypatch: pytest.MonkeyPatch, fgvc_log: pytest.LogCaptureFixture, drop_rate: float, caught: str
) -> None:
    """``GraphedTraining._capture`` end to end on the CPU, with torch.cuda's graph and stream calls standing in: graphs
    whose replays compute nothing leave what the capture itself computed, which the check finds wrong, so training
    stays eager. Without dropout the forward agrees (same batch, batch statistics) and the gradients give it away (the
    capture's backward ran on an unfilled gradient); with dropout the forward's masks already differ. The warm-up,
    capture and check moved the BatchNorm statistics and drew random numbers; both are as they were before."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    stream = SimpleNamespace(wait_stream=lambda _other: None)
    fakes = {
        "get_rng_state": lambda device: torch.get_rng_state(),
        "set_rng_state": lambda state, device: torch.set_rng_state(state),
        "Stream": lambda device: stream, "current_stream": lambda device: stream, "stream": lambda _s: nullcontext(),
        "set_stream": lambda _s: None, "CUDAGraph": _InertGraph, "graph_pool_handle": lambda: None,
        "graph": lambda graph, **kwargs: nullcontext(),
    }  # fmt: skip
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    torch.manual_seed(0)
    model = create_model("timm:test_resnet", 7, None).train()
    model.drop_rate = drop_rate  # when set, every forward draws random numbers
    wrapped = GraphedTraining(model, None)
    x = torch.randn(6, 3, 48, 48)
    model(x).sum().backward()  # a step before: its statistics and gradients are what the capture must keep
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = [p.grad.clone() for p in model.parameters()]
    rng_before = torch.get_rng_state()
    assert wrapped._capture(x, wrapped._key(x)) is None
    assert wrapped.eager_reason is not None and caught in wrapped.eager_reason
    assert "CUDA graphs for training ResNet not used" in fgvc_log.text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # num_batches_tracked included
    assert all(torch.equal(g, p.grad) for g, p in zip(grads_before, model.parameters(), strict=True))
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_training_on_cpu_inputs_runs_the_model_itself() -> None:
    torch.manual_seed(0)
    model = create_model("timm:test_resnet", 7, None)
    wrapped = GraphedTraining(model, None)
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    _train(wrapped, model, _trainer_inputs("cpu", 3), rt)
    assert not wrapped.captured and wrapped.replays == 0 and wrapped.eager_reason is None
    assert list(wrapped.state_dict()) == [f"model.{key}" for key in model.state_dict()]


@pytest.mark.parametrize(
    ("device", "distributed", "grad_accum", "compiled", "reason"),
    [
        ("cuda", False, 1, False, None),
        ("cpu", False, 1, False, "need a CUDA device"),
        ("cuda", True, 1, False, "not under DDP"),
        ("cuda", False, 2, False, "grad_accum 2"),
        ("cuda", False, 1, True, "under --compile"),
    ],
)
def test_training_graphs_say_why_they_are_not_used(
    device: str, distributed: bool, grad_accum: int, compiled: bool, reason: str | None
) -> None:
    from fgvc.engine.stage import training_graph_obstacle

    rt = Runtime(device=torch.device(device), amp_dtype=None, channels_last=True, world_size=2 if distributed else 1)
    obstacle = training_graph_obstacle(rt, grad_accum, compiled)
    assert obstacle is None if reason is None else reason in (obstacle or "")


def test_the_training_module_follows_runtime_cuda_graph_train(fgvc_log: pytest.LogCaptureFixture) -> None:
    from fgvc.config import RuntimeConfig
    from fgvc.engine.stage import _training_module

    model = create_model("timm:test_resnet", 7, None)
    cpu = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    assert RuntimeConfig().cuda_graph_train is False  # off until measured on a GPU
    assert _training_module(model, cpu, RuntimeConfig(), True, 1, True) is model
    assert "cuda_graph_train" not in fgvc_log.text  # not asked for: nothing to say
    assert _training_module(model, cpu, RuntimeConfig(cuda_graph_train=True), True, 1, True) is model
    assert "runtime.cuda_graph_train: training without CUDA graphs, CUDA graphs need a CUDA device" in fgvc_log.text
    cuda = Runtime(device=torch.device("cuda"), amp_dtype=torch.bfloat16, channels_last=True)
    wrapped = _training_module(model, cuda, RuntimeConfig(cuda_graph_train=True), True, 1, True)
    assert isinstance(wrapped, GraphedTraining) and wrapped.model is model and wrapped.autocast_dtype == torch.bfloat16
    assert _training_module(model, cuda, RuntimeConfig(cuda_graph_train=True), False, 1, True) is model  # no optimiser


def _cuda_trainee(drop_rate: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("timm:test_resnet", 7, None)
    if drop_rate:
        model.drop_rate = drop_rate  # timm's ResNet reads it in forward_head
    return model.cuda().to(memory_format=torch.channels_last)


CUDA_RT = None if not torch.cuda.is_available() else Runtime(torch.device("cuda"), torch.bfloat16, True)


@needs_cuda
@pytest.mark.parametrize("tune", ["all", "bn+fc"])
def test_on_cuda_graphed_training_matches_eager_training(tune: str, deterministic_cudnn: None) -> None:
    """Six full batches and a short one through fgvc's loop: seen (eager), captured (its replay checked), four
    replays, the short one eager. Parameters and BatchNorm statistics end as the eager model's (the capture's
    warm-up forwards must not move the statistics); stage 2's layout (most modules in eval mode) too."""
    assert CUDA_RT is not None
    eager, graphed = _cuda_trainee(), _cuda_trainee()
    batches = _trainer_inputs("cuda", 6, short=True)
    loss_eager = _train(eager, eager, batches, CUDA_RT, tune)
    wrapped = GraphedTraining(graphed, torch.bfloat16)
    loss_graphed = _train(wrapped, graphed, batches, CUDA_RT, tune)
    assert wrapped.captured and wrapped.eager_reason is None and wrapped.replays == 5
    assert abs(loss_eager - loss_graphed) < 1e-2
    assert _states_differ(eager, graphed) < 1e-2
    untrained = _cuda_trainee()
    assert _states_differ(eager, untrained, counters=False) > 10 * _states_differ(eager, graphed)  # they did learn


@needs_cuda
def test_on_cuda_a_mode_change_after_the_capture_runs_eagerly() -> None:
    assert CUDA_RT is not None
    model = _cuda_trainee()
    wrapped = GraphedTraining(model, torch.bfloat16)
    batches = _trainer_inputs("cuda", 3)
    _train(wrapped, model, batches, CUDA_RT, "all")
    assert wrapped.replays == 2
    _train(wrapped, model, batches, CUDA_RT, "bn+fc")  # another train/eval layout: not what was captured
    assert wrapped.replays == 2 and wrapped.captured


@needs_cuda
def test_on_cuda_dropout_replays_as_the_eager_forward_with_the_same_generator() -> None:
    """The capture's check compares the first replay with an eager forward that started from the same random state:
    with dropout on, that only holds if the capture hands the generator back as it found it."""
    assert CUDA_RT is not None
    model = _cuda_trainee(drop_rate=0.5)
    wrapped = GraphedTraining(model, torch.bfloat16)
    _train(wrapped, model, _trainer_inputs("cuda", 4), CUDA_RT)
    assert wrapped.eager_reason is None and wrapped.captured and wrapped.replays == 3


@needs_cuda
def test_on_cuda_graphed_training_beside_the_decoding_thread_matches_eager_training(
    tmp_path: Path, deterministic_cudnn: None
) -> None:
    """``decode: gpu`` training: the Prefetcher's thread decodes and augments on its own streams while the main thread
    captures and replays. The eager model, trained afterwards on the very batches the graphed one got, ends the same."""
    from fgvc.gpu_decode import GpuBatchPreparer
    from fgvc.prefetch import Prefetcher, wait_prepared

    cuda = torch.device("cuda")
    batches = _encoded_batches(tmp_path)
    eager, graphed = _cuda_trainee(), _cuda_trainee()
    meta = get_meta(graphed)
    wrapped = GraphedTraining(graphed, torch.bfloat16)
    prepare = GpuBatchPreparer("train", 48, meta.mean, meta.std, cuda)
    inputs: list[tuple] = []
    criterion = nn.CrossEntropyLoss()
    for model, net in ((graphed, wrapped), (eager, eager)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        source = Prefetcher(batches, prepare, cuda) if net is wrapped else inputs[:]
        for prepared, labels, _rows in source:
            x = wait_prepared(prepared) if net is wrapped else prepared
            if net is wrapped:
                inputs.append((x.clone(), labels, None))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = criterion(net(x), labels.to(cuda))
            loss.backward()
            optimizer_step(optimizer, None)
    assert wrapped.captured and wrapped.replays == len(batches) - 1
    assert _states_differ(eager, graphed) < 1e-2


@needs_cuda
def test_on_cuda_a_training_step_that_cannot_be_captured_is_a_one_line_error() -> None:
    line = _uncapturable("GraphedTraining(SyncsOnTheHost().cuda().train(), None)", "wrapped(x).sum().backward()")
    assert line.startswith("ConfigError: runtime.cuda_graph_train: SyncsOnTheHost's training step cannot")
    assert line.endswith("train with --no-cuda-graph (runtime.cuda_graph_train: false)")


def _stages_losses(data_root: Path, out: Path, graphed: bool, device: str) -> list[float]:
    """Stage 1 (two epochs, with a weight average: updated after each replayed step) then stage 2 (uncached, from that
    average) of the tiny demo run, as `fgvc stage1/stage2` run them, with or without ``runtime.cuda_graph_train``:
    every epoch's mean training loss."""
    from conftest import tiny_config

    from fgvc.engine.stage import run_stage1, run_stage2

    runtime = {"deterministic": True, "seed": 0, "device": device, "cuda_graph_train": graphed, "cache_features": "off"}
    # decode pinned: `auto` times the model on each run and may choose GPU decoding for one run and not the other
    cfg = tiny_config(data_root, out, data={"decode": "cpu"}, stage1={"epochs": 2, "ema_decay": 0.9}, runtime=runtime)
    first = run_stage1(cfg, progress=False)
    second = run_stage2(cfg.run_dir(), {}, progress=False)
    assert first.interrupted_by is None and second.interrupted_by is None
    assert (second.stage_dir / "best.pt").is_file()
    return [*first.history["train_loss"], *second.history["train_loss"]]


@needs_cuda
def test_on_cuda_both_stages_train_with_graphed_steps_as_without(
    tiny_demo_root: Path, tmp_path: Path, fgvc_log: pytest.LogCaptureFixture
) -> None:
    """The whole path: `runtime.cuda_graph_train` through ``_training_module``, stage 1 and stage 2's frozen layout,
    validation and checkpoints between epochs. Each stage captures once and trains as the eager run does."""
    eager = _stages_losses(tiny_demo_root, tmp_path / "eager", False, "cuda")
    assert "CUDA graphs captured for training" not in fgvc_log.text
    graphed = _stages_losses(tiny_demo_root, tmp_path / "graphed", True, "cuda")
    assert fgvc_log.text.count("CUDA graphs captured for training") == 2  # stage 1, stage 2
    assert "training eagerly" not in fgvc_log.text
    assert graphed == pytest.approx(eager, rel=1e-2)
