"""Read a training loader's epochs from one iterator, so that its workers never wait for the next epoch to begin.

Why: persistent workers survive between epochs, but a DataLoader hands them the next epoch's batches only when the
loop asks for a new iterator. Each epoch then starts with an empty queue, and its first batch costs one worker a whole
batch of decoding and augmenting: 0.30 s of a 6.8 s InceptionResNet-V2 window on an H200 (its stage-1 row read 0.89
of the ceiling with it, 0.93 without), and a larger share of each epoch of a small fine-grained dataset (Flowers 102
trains 1,020 images an epoch). Here one iterator spans all the epochs a stage will train; the workers load the next
epoch's first batches while this epoch's last ones train and its validation runs.

Data flow::

    EpochBatches.span(first, last, start) -> DataLoader (one iterator) -> EpochStream.epoch(e): that epoch's batches
    -> train_one_epoch (as if it were the loader of one epoch)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from fgvc.engine.sampling import EpochBatches


def epoch_batches(loader: Any) -> EpochBatches:
    """The :class:`EpochBatches` of a training loader from ``make_loader`` (a :class:`fgvc.prefetch.Prefetcher`'s
    too)."""
    batches = getattr(getattr(loader, "loader", loader), "batch_sampler", None)
    if not isinstance(batches, EpochBatches):
        raise TypeError(f"expected a training loader batched by EpochBatches, got {type(batches).__name__}")
    return batches


class EpochStream:
    """Epochs ``first`` .. ``last - 1`` of a training loader, read from one iterator.

    :meth:`epoch` gives one epoch's batches, with ``len()``, in place of the loader: read them in order, each to its
    end (a stop signal may end the run inside the last one read). :meth:`close` ends the stream and returns the
    loader to one epoch per iterator. Nothing is loaded before the first epoch is iterated.
    """

    def __init__(self, loader: Iterable[Any], first: int, last: int, start: int = 0) -> None:
        self.loader = loader
        self.batches = epoch_batches(loader)
        self.batches.span(first, last, start)
        self.first, self.last, self.start = first, last, start
        self._iterator: Iterator[Any] | None = None
        self._next_epoch = first
        self._handed = 0  # batches in the epochs handed out so far
        self._read = 0  # batches read from the iterator

    def epoch(self, epoch: int) -> StreamEpoch:
        """The batches of ``epoch``, the next one in order, after the previous one was read to its end."""
        if epoch != self._next_epoch or epoch >= self.last:
            raise RuntimeError(f"epoch {epoch} asked of a stream whose next epoch is {self._next_epoch} (of "
                               f"{self.first}..{self.last - 1})")  # fmt: skip
        if self._read != self._handed:
            raise RuntimeError(f"epoch {epoch - 1} was left after {self._read} of {self._handed} batches")
        self._next_epoch += 1
        count = self.batches.batches_in(self.start if epoch == self.first else 0)
        self._handed += count
        return StreamEpoch(self, count)

    def next_batch(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        batch = next(self._iterator)
        self._read += 1
        return batch

    def close(self) -> None:
        """End the stream: a prefetching thread stops, and the loader batches one epoch per iterator again."""
        iterator, self._iterator = self._iterator, None
        close = getattr(iterator, "close", None)  # a generator (Prefetcher): runs its cleanup now
        if close is not None:
            close()
        self.batches.clear_span()


class StreamEpoch:
    """One epoch of an :class:`EpochStream`: iterable once, with the number of batches it holds."""

    def __init__(self, stream: EpochStream, count: int) -> None:
        self.stream = stream
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.count):
            yield self.stream.next_batch()
