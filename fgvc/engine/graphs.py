"""A model's inference forward (:class:`GraphedInference`) or training step (:class:`GraphedTraining`, opt-in with
``runtime.cuda_graph_train``) replayed from CUDA graphs: one launch per pass instead of one per kernel.

Why: a network of many small kernels is paced by the host thread that queues them. InceptionResNet-V2's 10-crop
forward at 681 px is ~1,360 launches for 37 ms of device work; on a lent H200 fgvc's 10-crop loop reached 0.96 of the
model's speed over batches already in memory, but 0.72-0.84 with loader workers sharing the host. A replayed graph
queues the whole forward at once, so the host's speed stops setting the pace. On by default (``runtime.cuda_graph``)
since the 2026-11-27 H200 run of ``benchmarks/throughput.py``: 10-crop prediction 1.10 x the eager loop on
InceptionResNet-V2, 1.02 x on SENet-154, 1.01 x on ResNet-50, with identical probabilities.

When a batch shape comes a second time in a row it is captured (a short first batch, with unreadable images dropped,
is not); the batch after the capture is run both ways, and the graph is kept only if the two agree. From then on
batches of that shape are replayed and others (the last, shorter batch) run eagerly. The replay reads the parameters
and buffers in place, so the model must not be replaced or moved in between (prediction does neither).

The training step follows the same rules (see its docstring). A capture that fails is an error, not a silent
fallback: PyTorch's caching allocator stays in capture mode after a failed capture (its private pool is never
closed), which would leak every later batch's memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from fgvc.errors import ConfigError

log = logging.getLogger(__name__)

# Most |probability difference| between a replay and the eager forward on the same batch. Both run the same kernels
# (cuDNN's choices are cached during the warm-up), so they normally agree to the bit; a stale buffer would not.
AGREEMENT_TOLERANCE = 1e-3
WARMUP_FORWARDS = 3  # eager forwards before the capture: cuDNN picks its algorithms outside the graph
# Fewest batches a prediction pass must have to be worth capturing: the capture costs about WARMUP_FORWARDS + 1 extra
# forwards (the warm-up and the checked batch), and a replay saves at most ~10% of a forward (measured on an H200).
MIN_BATCHES_TO_CAPTURE = 50


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_out: torch.Tensor
    key: tuple[object, ...]
    checked: bool = False  # replayed once against the eager forward on a batch other than the captured one


def _first_cause(err: BaseException) -> str:
    """The first line of the error that started a chain: when the forward fails inside a capture, ending the capture
    raises again ("operation failed due to a previous error during capture"), with the real cause as its context."""
    while err.__context__ is not None:
        err = err.__context__
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _capture_failed(
    err: Exception, caller_stream: torch.cuda.Stream, setting: str, what: str, command: str
) -> ConfigError:
    """The caller's stream made current again (a failed capture leaves its own one current) and the one-line error
    that names the cause and the way around it."""
    torch.cuda.set_stream(caller_stream)
    return ConfigError(f"{setting}: {what} cannot be captured in a CUDA graph ({_first_cause(err)}); {command} with "
                       f"--no-cuda-graph ({setting}: false)")  # fmt: skip


def _shape_key(x: torch.Tensor) -> tuple[object, ...]:
    return tuple(x.shape), x.stride(), x.dtype, x.device


CaptureT = TypeVar("CaptureT")


class _GraphWrapper(nn.Module, Generic[CaptureT]):
    """What both graph wrappers hold: the wrapped model, the precision its caller runs under, the capture (None until
    a batch's key repeats), and why they stay eager once they do for good."""

    giving_up = "CUDA graph for %s not used: %s"  # the warning: the model's class, then the reason

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        self._captured: CaptureT | None = None
        self._last_key: tuple[object, ...] | None = None
        self.eager_reason: str | None = None  # why the model stays eager, once it does for good
        self.replays = 0

    @property
    def captured(self) -> bool:
        return self._captured is not None

    def _autocast(self) -> AbstractContextManager[None]:
        """The caller's precision for a capture, with autocast's cache off: a cached cast would be freed when the
        caller's autocast region ends, while the graph still reads it."""
        dtype = self.autocast_dtype or torch.float32
        return torch.autocast("cuda", dtype=dtype, enabled=self.autocast_dtype is not None, cache_enabled=False)

    def _give_up(self, reason: str) -> None:
        self.eager_reason = reason
        self._captured = None
        log.warning(self.giving_up, type(self.model).__name__, reason)


class GraphedInference(_GraphWrapper[_Captured]):
    """``model``'s forward, replayed from a CUDA graph for batches of its usual shape; eager otherwise.

    Eager (the wrapped model called directly) for CPU inputs, in training mode or with gradients enabled, for shapes
    other than the captured one, and after the check found the replay disagreeing. The replay's output is copied out,
    so a caller may keep it across batches.

    Args:
        autocast_dtype: the precision the caller runs under (``Runtime.amp_dtype``; None for fp32). The capture casts
            the weights inside the graph, so the autocast cache stays off there: a cached cast would be freed when the
            caller's autocast region ends, while the graph still reads it.

    Raises:
        ConfigError: the forward cannot be captured (it reads values back to the host, say); predict with
            ``--no-cuda-graph`` (``runtime.cuda_graph: false``).
    """

    giving_up = "CUDA graph for %s not used: %s; running the forward eagerly"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.eager_reason is not None or not x.is_cuda or self.model.training or torch.is_grad_enabled():
            return self.model(x)
        key = _shape_key(x)
        captured = self._captured
        if captured is None:
            repeated, self._last_key = key == self._last_key, key
            if repeated:
                self._captured = self._capture(x)
            return self.model(x)
        if key != captured.key:
            return self.model(x)
        captured.static_in.copy_(x)
        captured.graph.replay()
        self.replays += 1
        replayed = captured.static_out.clone()
        if not captured.checked:
            eager = self.model(x)
            problem = _probabilities_disagree(replayed, eager)
            if problem:
                self._give_up(problem)
                return eager
            captured.checked = True
        return replayed

    def _capture(self, x: torch.Tensor) -> _Captured:
        static_in = x.clone(memory_format=torch.preserve_format)
        caller_stream = torch.cuda.current_stream(x.device)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(caller_stream)
        with torch.cuda.stream(side), self._autocast():
            for _ in range(WARMUP_FORWARDS):
                self.model(static_in)
        caller_stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the loader's pin thread and the GPU-decoding thread keep using CUDA while this one captures
            with torch.cuda.graph(graph, capture_error_mode="thread_local"), self._autocast():
                static_out = self.model(static_in)
        except Exception as err:
            self.eager_reason = "capture failed"  # never again in this process: the allocator is still capturing
            raise _capture_failed(err, caller_stream, "runtime.cuda_graph", f"{type(self.model).__name__}'s forward",
                                  "predict") from err  # fmt: skip
        log.info("CUDA graph captured for input %s: one launch per batch", tuple(x.shape))
        return _Captured(graph, static_in, static_out, _shape_key(x))


class _Step(torch.autograd.Function):
    """One captured training forward as a node of the caller's autograd graph: its backward replays the captured
    backward, which writes the trainable parameters' gradients into the capture's static tensors."""

    @staticmethod
    def forward(ctx: Any, step: _TrainingCapture, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        step.static_in.copy_(x)
        step.forward_graph.replay()
        step.forwards += 1
        ctx.step, ctx.forward_number = step, step.forwards
        return step.static_out.clone()  # the caller may keep it past the next replay

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        step: _TrainingCapture = ctx.step
        if ctx.forward_number != step.forwards:  # the graph's saved activations are a later forward's now
            raise RuntimeError("runtime.cuda_graph_train: a backward must follow its own forward, before the next one; "
                               "train with --no-cuda-graph")  # fmt: skip
        step.static_grad_out.copy_(grad_out)
        step.backward_graph.replay()
        # Views of the static gradients: AccumulateGrad adopts them as ``.grad`` (no copy). The next replay overwrites
        # them, which is why each optimiser step must follow one backward (GraphedTraining's grad_accum 1 rule) and
        # the optimiser must set the gradients to None after its step (fgvc's optimizer_step does).
        return (None, None, *(g.detach() if g is not None else None for g in step.static_grads))


@dataclass
class _TrainingCapture:
    forward_graph: torch.cuda.CUDAGraph
    backward_graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_out: torch.Tensor
    static_grad_out: torch.Tensor
    static_grads: tuple[torch.Tensor | None, ...]
    params: tuple[torch.Tensor, ...]
    key: tuple[object, ...]
    forwards: int = 0  # forward replays so far: a backward checks that no other forward replayed since its own


# Largest relative difference (per parameter, in norm) between the gradients of a replayed backward and of the eager
# backward on the same batch. Both run the same kernels; cuDNN's weight gradients may add in another order (atomics),
# which moves bf16 gradients by well under 1%. Work missing from the graph would leave stale or empty gradients: ~100%.
GRADIENT_TOLERANCE = 0.05


class GraphedTraining(_GraphWrapper[_TrainingCapture]):
    """``model``'s training forward and backward, each replayed from a CUDA graph: two graph launches per step.

    Why: ResNet-50 at 224 px trains at ~4,300 img/s on an H200 (a step every ~30 ms), and a step is ~1,450 operator
    calls from the Python thread (915 kernel launches). With ``decode: gpu`` that thread shares the interpreter lock
    with the nvJPEG-preparing thread and the loader's pin thread: on the 2026-11-27 H200 traces it took ~30 ms to
    queue one forward (15 ms with CPU decoding), and the epoch ran at 0.68-0.76 of the model's speed. Replayed, the
    forward and the backward are one graph launch each, whoever holds the lock.

    Captured like :class:`GraphedInference`: the second batch in a row of one shape and one train/eval layout of the
    modules; other shapes (the last, shorter batch) run eagerly. Before it is used, one replay of both graphs is
    checked against the eager forward and backward of the same batch, from the same random state; the capture and the
    check leave the BatchNorm statistics and the random generator as they found them. One process only, one backward
    per forward and per optimiser step (see ``_Step.backward``), and the parameters must not be replaced in between.

    Written by hand rather than with ``torch.cuda.make_graphed_callables``, which follows the same steps: until torch
    2.14 it captures with ``capture_error_mode="global"``, which fails while the GPU-decoding thread uses CUDA. That
    thread must not draw CUDA random numbers during a capture (torch 2.11 raises "Offset increment outside graph
    capture"); its augmentation draws them on the CPU (``fgvc.gpu_decode``).

    The graphs' private pool keeps one step's activations for good, so an eager step (the epoch's short last batch) or
    validation allocates on top of it: a batch size chosen at the edge of the GPU's memory may not fit.

    Raises:
        ConfigError: the training step cannot be captured; train with ``--no-cuda-graph``
            (``runtime.cuda_graph_train: false``).
    """

    giving_up = "CUDA graphs for training %s not used: %s; training eagerly"

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None) -> None:
        super().__init__(model, autocast_dtype)
        self._all_modules = list(model.modules())
        self._all_params = list(model.parameters())

    def _key(self, x: torch.Tensor) -> tuple[object, ...]:
        """What a capture is only valid for: the batch's shape and layout, which modules train (stage 2 keeps most of
        them in eval mode, and a graph keeps the mode it was captured in) and which parameters learn."""
        modes = tuple(m.training for m in self._all_modules)
        return (*_shape_key(x), modes, tuple(p.requires_grad for p in self._all_params))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.eager_reason is not None or not x.is_cuda or not torch.is_grad_enabled() or x.requires_grad:
            return self.model(x)
        key = self._key(x)
        captured = self._captured
        if captured is None:
            repeated, self._last_key = key == self._last_key, key
            if not repeated:
                return self.model(x)
            self._captured = captured = self._capture(x, key)
            if captured is None:
                return self.model(x)
        elif key != captured.key:
            return self.model(x)
        self.replays += 1
        return _Step.apply(captured, x, *captured.params)

    def _capture(self, x: torch.Tensor, key: tuple[object, ...]) -> _TrainingCapture | None:
        """Both graphs, captured on ``x`` and checked against the eager step; None (eager from now on) when the check
        fails. The model's buffers and the random generator end as they were."""
        params = tuple(p for p in self.model.parameters() if p.requires_grad)
        if not params:
            self._give_up("the model has no trainable parameter")
            return None
        device = x.device
        buffers = list(self.model.buffers())
        saved = [b.detach().clone() for b in buffers]  # BN statistics: the warm-up and the check move them
        rng = torch.cuda.get_rng_state(device)

        def as_found() -> None:
            _restore(buffers, saved)
            torch.cuda.set_rng_state(rng, device)

        # Every backward here runs outside autocast, as the training loop's does (the caller's region is still open).
        gradients = partial(_gradients_without_autocast, params)
        with self._autocast():  # the check's eager step, from the random state the checked replay will start from
            eager_out = self.model(x)
        probe = torch.randn(eager_out.shape, generator=torch.Generator().manual_seed(0)).to(eager_out)
        eager_grads = gradients(eager_out, probe)
        eager_out = eager_out.detach()
        as_found()
        static_in = x.detach().clone(memory_format=torch.preserve_format)
        caller_stream = torch.cuda.current_stream(device)
        stream = torch.cuda.Stream(device)  # the warm-up and both captures: the backward runs where its forward did
        stream.wait_stream(caller_stream)
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_FORWARDS):  # cuDNN picks the forward's and the backward's algorithms outside
                with self._autocast():
                    out = self.model(static_in)
                gradients(out, torch.ones_like(out))
        caller_stream.wait_stream(stream)
        forward_graph, backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        pool = torch.cuda.graph_pool_handle()
        try:
            # thread_local: the loader's pin thread and the GPU-decoding thread keep using CUDA while this one captures
            capture = partial(torch.cuda.graph, pool=pool, stream=stream, capture_error_mode="thread_local")
            with capture(forward_graph), self._autocast():
                static_out = self.model(static_in)
            static_grad_out = torch.empty_like(static_out)
            with capture(backward_graph):
                static_grads = gradients(static_out, static_grad_out)
        except Exception as err:
            self.eager_reason = "capture failed"  # never again in this process: the allocator is still capturing
            raise _capture_failed(err, caller_stream, "runtime.cuda_graph_train",
                                  f"{type(self.model).__name__}'s training step", "train") from err  # fmt: skip
        # Beginning a capture writes the generator's seed and offset for the graph on ``stream`` (torch 2.11); the
        # checked replay writes and reads them on the caller's stream.
        caller_stream.wait_stream(stream)
        as_found()
        captured = _TrainingCapture(forward_graph, backward_graph, static_in, static_out, static_grad_out,
                                    tuple(static_grads), params, key)  # fmt: skip
        captured.static_in.copy_(x)
        forward_graph.replay()
        captured.static_grad_out.copy_(probe)
        backward_graph.replay()
        problem = _disagreement(static_out, eager_out, captured.static_grads, eager_grads)
        as_found()  # the checked replay moved them too: the step that follows starts where the eager one would
        if problem:
            self._give_up(problem)
            return None
        log.info("CUDA graphs captured for training on input %s: two graph launches per step", tuple(x.shape))
        return captured


def _gradients_without_autocast(
    params: tuple[torch.Tensor, ...], out: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    with torch.autocast("cuda", enabled=False):
        return torch.autograd.grad(out, params, grad_out, allow_unused=True)


def _probabilities_disagree(replayed: torch.Tensor, eager: torch.Tensor) -> str:
    """Why a replay's logits are not the eager forward's ("" when their probabilities agree)."""
    difference = (F.softmax(replayed.float(), 1) - F.softmax(eager.float(), 1)).abs().max().item()
    if not difference <= AGREEMENT_TOLERANCE:  # also catches NaN
        return f"its probabilities differ from the eager forward's by {difference:.1e}"
    return ""


def _disagreement(
    out: torch.Tensor,
    eager_out: torch.Tensor,
    grads: Sequence[torch.Tensor | None],
    eager_grads: Sequence[torch.Tensor | None],
) -> str:
    """Why a replayed step differs from the eager one ("" when it agrees): its probabilities, or a gradient."""
    if problem := _probabilities_disagree(out, eager_out):
        return problem
    pairs = [(g, e) for g, e in zip(grads, eager_grads, strict=True) if g is not None and e is not None]
    if not pairs:
        return ""
    norms = torch.stack([e.float().norm() for _g, e in pairs])
    # A gradient that is zero in theory (a bias just before a train-mode BatchNorm) is rounding noise on both sides:
    # measured against a thousandth of the largest gradient's norm, not against itself.
    floor = (norms.max() * 1e-3).clamp_min(1e-12)
    gaps = torch.stack([(g.float() - e.float()).norm() for g, e in pairs]) / torch.maximum(norms, floor)
    worst = gaps.max().item()
    if not worst <= GRADIENT_TOLERANCE:
        return f"a gradient differs from the eager backward's by {worst:.1e} of its norm"
    return ""


def _restore(buffers: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(buffers, saved, strict=True):
            buffer.copy_(value)
