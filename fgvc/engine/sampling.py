"""Deterministic, resumable sampling.

Each epoch's order is a function of (seed, epoch) and each sample's augmentation seed a function of (seed, epoch,
position), so a run interrupted mid-epoch resumes on exactly the batches (and random crops) it would have seen. The
sampler yields ``(index, sample_seed)`` pairs; :class:`fgvc.data.ImageDataset` reseeds its transform with the second
item, which also works with persistent workers (no state has to reach the worker processes).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[tuple[int, int]]):
    """Shard of a seeded permutation for one rank, with a start offset for mid-epoch resume.

    Training (``shuffle=True``) pads the permutation so every rank gets the same number of samples (DDP needs equal
    step counts); evaluation (``shuffle=False``) never pads, so every image is scored exactly once.
    """

    def __init__(self, size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0  # samples of this rank's shard already consumed (resume)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def _indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
            total = -(-self.size // self.world_size) * self.world_size
            order = (order * -(-total // max(self.size, 1)))[:total]  # repeated as often as needed (tiny datasets)
        else:
            order = list(range(self.size))
        return order[self.rank :: self.world_size]

    def epoch_samples(self, epoch: int, start: int = 0) -> Iterator[tuple[int, int]]:
        """``(index, sample_seed)`` of ``epoch`` from position ``start`` of this rank's shard: what iterating the
        sampler yields after ``set_epoch(epoch, start)``."""
        base = (self.seed * 1_000_003 + epoch) * 10_000_019
        for position, index in enumerate(self._indices(epoch)):
            if position >= start:
                yield index, (base + position * self.world_size + self.rank) % 2**31

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.epoch_samples(self.epoch, self.start)

    def shard_size(self) -> int:
        """Samples of one whole epoch on this rank. Counted, not drawn: the loader asks several times an epoch, and a
        permutation of iNat 2021's 2.7M images takes a second."""
        if self.shuffle:
            return -(-self.size // self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return max(0, self.shard_size() - self.start)


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """A training loader's batches: of the sampler's current epoch, or of several epochs as one stream (:meth:`span`).

    Each epoch is batched on its own: its last short batch is kept, or dropped with ``drop_last``, inside that epoch,
    so no batch mixes two epochs and an epoch read as part of a span holds exactly the batches it holds read alone
    (a resumed run sees the same ones). Without a span it batches what the sampler yields after ``set_epoch``, as the
    DataLoader's own batching would. :class:`fgvc.engine.epochs.EpochStream` sets the span.
    """

    def __init__(self, sampler: EpochSampler, batch_size: int, drop_last: bool) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self._span: tuple[int, int, int] | None = None

    def span(self, first: int, last: int, start: int = 0) -> None:
        """From now on yield epochs ``first`` .. ``last - 1``, the first from position ``start`` (a resume)."""
        self._span = (first, last, start)

    def clear_span(self) -> None:
        """Back to the sampler's current epoch alone."""
        self._span = None

    def batches_in(self, start: int = 0) -> int:
        """Batches of one epoch read from position ``start`` of this rank's shard."""
        samples = max(0, self.sampler.shard_size() - start)
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def _epochs(self) -> list[tuple[int, int]]:
        """``(epoch, start)`` of every epoch to batch."""
        if self._span is None:
            return [(self.sampler.epoch, self.sampler.start)]
        first, last, start = self._span
        return [(epoch, start if epoch == first else 0) for epoch in range(first, last)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch, start in self._epochs():
            batch: list[tuple[int, int]] = []
            for sample in self.sampler.epoch_samples(epoch, start):
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            if batch and not self.drop_last:
                yield batch

    def __len__(self) -> int:
        return sum(self.batches_in(start) for _, start in self._epochs())
