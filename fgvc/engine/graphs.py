"""A model's inference forward replayed from a CUDA graph: one launch per batch instead of one per kernel.

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

A capture that fails is an error, not a silent fallback: PyTorch's caching allocator stays in capture mode after a
failed capture (its private pool is never closed), which would leak every later batch's memory.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass

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


def _shape_key(x: torch.Tensor) -> tuple[object, ...]:
    return tuple(x.shape), x.stride(), x.dtype, x.device


class GraphedInference(nn.Module):
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

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        self._captured: _Captured | None = None
        self._last_key: tuple[object, ...] | None = None
        self.eager_reason: str | None = None  # why the forward stays eager, once it does for good
        self.replays = 0

    @property
    def captured(self) -> bool:
        return self._captured is not None

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
            difference = (F.softmax(replayed.float(), 1) - F.softmax(eager.float(), 1)).abs().max().item()
            if not difference <= AGREEMENT_TOLERANCE:  # also catches NaN
                self._give_up(f"its probabilities differ from the eager forward's by {difference:.1e}")
                return eager
            captured.checked = True
        return replayed

    def _autocast(self) -> AbstractContextManager[None]:
        dtype = self.autocast_dtype or torch.float32
        return torch.autocast("cuda", dtype=dtype, enabled=self.autocast_dtype is not None, cache_enabled=False)

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
            torch.cuda.set_stream(caller_stream)  # a failed capture leaves its own stream current
            self.eager_reason = "capture failed"  # never again in this process: the allocator is still capturing
            raise ConfigError(
                f"runtime.cuda_graph: {type(self.model).__name__}'s forward cannot be captured in a CUDA graph "
                f"({_first_cause(err)}); predict with --no-cuda-graph (runtime.cuda_graph: false)"
            ) from err
        log.info("CUDA graph captured for input %s: one launch per batch", tuple(x.shape))
        return _Captured(graph, static_in, static_out, _shape_key(x))

    def _give_up(self, reason: str) -> None:
        self.eager_reason = reason
        self._captured = None
        log.warning("CUDA graph for %s not used: %s; running the forward eagerly", type(self.model).__name__, reason)
