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

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
            total = -(-self.size // self.world_size) * self.world_size
            order = (order * -(-total // max(self.size, 1)))[:total]  # repeated as often as needed (tiny datasets)
        else:
            order = list(range(self.size))
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        for position, index in enumerate(self._indices()):
            if position >= self.start:
                yield index, (base + position * self.world_size + self.rank) % 2**31

    def __len__(self) -> int:
        """Counted, not drawn: the loader asks several times an epoch, and a permutation of iNat 2021's 2.7M images
        takes a second."""
        shard = -(-self.size // self.world_size) if self.shuffle else len(range(self.rank, self.size, self.world_size))
        return max(0, shard - self.start)
