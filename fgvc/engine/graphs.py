"""A model's inference forward replayed from a CUDA graph: one launch per batch instead of one per kernel.

Why: a network of many small kernels is paced by the host thread that queues them. InceptionResNet-V2's 10-crop
forward at 681 px is ~1,360 launches for 37 ms of device work; on a lent H200 fgvc's 10-crop loop reached 0.96 of the
model's speed over batches already in memory, but 0.72-0.84 with loader workers sharing the host. A replayed graph
queues the whole forward at once, so the host's speed stops setting the pace. Opt-in (``runtime.cuda_graph``) until
it is measured end to end on a GPU (``benchmarks/throughput.py``'s "10-crop predict, CUDA graph" row).

The graph is captured at the first batch's shape; a batch of another shape (the last, shorter one) runs eagerly. The
replay reads the parameters and buffers in place, so the model must not be replaced or moved in between (prediction
does neither). The first replay is checked against the eager forward on the same batch; a capture that fails or
disagrees leaves the forward eager, with a warning saying why.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

AGREEMENT_TOLERANCE = 1e-3  # most |probability difference| allowed between the replay and the eager forward
WARMUP_FORWARDS = 3  # eager forwards before the capture: cuDNN picks its algorithms outside the graph


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_out: torch.Tensor
    key: tuple[object, ...]


def _shape_key(x: torch.Tensor) -> tuple[object, ...]:
    return tuple(x.shape), x.stride(), x.dtype, x.device


class GraphedInference(nn.Module):
    """``model``'s forward, replayed from a CUDA graph for inputs like the first one; eager otherwise.

    Eager (the wrapped model called directly) for CPU inputs, with gradients enabled, for shapes other than the
    captured one, and after a capture that failed or disagreed with the eager forward. The replay's output is copied
    out, so a caller may keep it across batches.

    Args:
        autocast_dtype: the precision the caller runs under (``Runtime.amp_dtype``; None for fp32). The capture casts
            the weights inside the graph, so the autocast cache stays off there: a cached cast would be freed when the
            caller's autocast region ends, while the graph still reads it.
    """

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        self._captured: _Captured | None = None
        self.eager_reason: str | None = None  # why the forward stays eager, once it does for good

    @property
    def captured(self) -> bool:
        return self._captured is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.eager_reason is not None or not x.is_cuda or torch.is_grad_enabled():
            return self.model(x)
        if self._captured is None:
            return self._capture_and_check(x)
        captured = self._captured
        if _shape_key(x) != captured.key:
            return self.model(x)
        captured.static_in.copy_(x)
        captured.graph.replay()
        return captured.static_out.clone()

    def _autocast(self) -> AbstractContextManager[None]:
        dtype = self.autocast_dtype or torch.float32
        return torch.autocast("cuda", dtype=dtype, enabled=self.autocast_dtype is not None, cache_enabled=False)

    def _capture_and_check(self, x: torch.Tensor) -> torch.Tensor:
        """Capture at ``x``'s shape, replay it on ``x`` and compare with the eager forward, whose output is returned."""
        eager = self.model(x)
        try:
            captured = self._capture(x)
            captured.graph.replay()
            replayed = captured.static_out.clone()
        except Exception as err:  # capture rejects host syncs, data-dependent shapes, CPU tensors...: stay eager
            self._give_up(f"capture failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
            return eager
        difference = (F.softmax(replayed.float(), 1) - F.softmax(eager.float(), 1)).abs().max().item()
        if not difference <= AGREEMENT_TOLERANCE:  # also catches NaN
            self._give_up(f"its probabilities differ from the eager forward's by {difference:.1e}")
            return eager
        self._captured = captured
        log.info("CUDA graph captured for input %s: one launch per batch", tuple(x.shape))
        return eager

    def _capture(self, x: torch.Tensor) -> _Captured:
        static_in = x.clone(memory_format=torch.preserve_format)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side), self._autocast():
            for _ in range(WARMUP_FORWARDS):
                self.model(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin thread and the GPU-decoding thread keep using CUDA while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), self._autocast():
            static_out = self.model(static_in)
        return _Captured(graph, static_in, static_out, _shape_key(x))

    def _give_up(self, reason: str) -> None:
        self.eager_reason = reason
        self._captured = None
        log.warning("CUDA graph for %s not used: %s; running the forward eagerly", type(self.model).__name__, reason)
