"""Prepare the next batches in a background thread while the training step of the current one is being queued.

Why: with ``decode: gpu`` the batch preparer (:class:`fgvc.gpu_decode.GpuBatchPreparer`) calls torchvision's nvJPEG
decoder, which returns only once the whole batch is decoded (it synchronises its own CUDA stream), then queues the
crops. Called from the loop, that wait and the training step's kernel launches take turns on one thread, and the
device idles between them. Here a thread decodes and augments batch k+1 on a stream of its own (the decoder call
releases the GIL) while the main thread queues step k; the main stream waits for that batch's event only.

Data flow::

    loader -> thread: prepare(batch) on the side stream, record an event -> queue (``depth`` batches)
    -> loop: prepare(Prepared) = main stream waits for the event -> model
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

_END = object()  # the thread ran out of batches
_JOIN_TIMEOUT_S = 60.0  # for the batch the thread may be waiting on
_PUT_POLL_S = 0.05


@dataclass
class Prepared:
    """A batch already on the device, and the event after which it is complete."""

    tensor: torch.Tensor
    ready: torch.cuda.Event | None

    def __len__(self) -> int:
        return len(self.tensor)


@dataclass
class PreparedRows:
    """What a ``prepare`` returns when some images of the batch turned out unreadable while it prepared them (and
    unreadable images are skipped): the tensor of the others, and which rows of the batch they are."""

    tensor: torch.Tensor
    kept: torch.Tensor  # (B,) bool


@dataclass
class _Failed:
    error: BaseException


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<the caller's current device>``: the thread must select the same device, by number."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def wait_prepared(batch: Prepared) -> torch.Tensor:
    """The ``prepare`` the loops call on a :class:`Prefetcher`'s batches: order the current stream after the batch.

    ``record_stream`` keeps the allocator from handing the tensor's memory back to the side stream while work queued
    on the current stream may still read it.
    """
    if batch.ready is not None:
        stream = torch.cuda.current_stream(batch.tensor.device)
        stream.wait_event(batch.ready)
        batch.tensor.record_stream(stream)
    return batch.tensor


class Prefetcher:
    """Iterates ``loader`` as ``(Prepared, labels, rows)``, ``prepare`` already applied by a background thread.

    Stands in for the loader everywhere (``len``, ``drop_last``, ``dataset``, ``sampler`` pass through); pair it with
    :func:`wait_prepared` as the loop's ``prepare``. An error raised while preparing (a corrupt image, say) is raised
    again in the loop, unchanged. Leaving an epoch early (a stop signal) ends the thread after its current batch.
    """

    def __init__(
        self, loader: DataLoader, prepare: Callable[[Any], Any], device: torch.device, depth: int = 2
    ) -> None:
        self.loader = loader
        self.prepare = prepare
        self.device = _indexed(torch.device(device))
        self.depth = depth

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (unpickling, copy): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[tuple[Prepared, Any, Any]]:
        batches: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        # Started here, not in the thread: the loader forks its worker processes now, from the main thread as without
        # prefetching (a fork from a second thread can copy locks other threads hold).
        source = iter(self.loader)
        worker = threading.Thread(target=self._produce, args=(source, batches, stop), name="fgvc-prefetch", daemon=True)
        worker.start()
        try:
            while True:
                item = batches.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:  # also when the loop leaves the epoch early: the thread sees the stop within one put attempt
            stop.set()
            worker.join(_JOIN_TIMEOUT_S)

    def _produce(self, source: Iterator[Any], batches: queue.Queue, stop: threading.Event) -> None:
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    batches.put(item, timeout=_PUT_POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            cuda = self.device.type == "cuda"
            if cuda:
                torch.cuda.set_device(self.device)
            stream = torch.cuda.Stream(self.device) if cuda else None
            for images, labels, rows in source:
                if stop.is_set():
                    return
                if stream is not None:
                    with torch.cuda.stream(stream):
                        tensor = self.prepare(images)
                        ready = torch.cuda.Event()
                        ready.record(stream)
                else:
                    tensor, ready = self.prepare(images), None
                if isinstance(tensor, PreparedRows):  # the loop sees only the rows that were read
                    labels, rows, tensor = labels[tensor.kept], rows[tensor.kept], tensor.tensor
                if not put((Prepared(tensor, ready), labels, rows)):
                    return
        except BaseException as err:  # handed to the loop, which raises it
            put(_Failed(err))
            return
        put(_END)
