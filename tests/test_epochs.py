"""Epochs read from one loader iterator: the same batches as one iterator per epoch, loaded ahead across epoch ends."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from fgvc.data import build_loader
from fgvc.engine.epochs import EpochStream, epoch_batches
from fgvc.engine.sampling import EpochBatches, EpochSampler
from fgvc.prefetch import Prefetcher


class Keys(Dataset):
    """Item = the ``(row, sample_seed)`` key itself; with ``marks``, each load also leaves a file named by the seed."""

    def __init__(self, size: int, marks: Path | None = None) -> None:
        self.size = size
        self.marks = marks

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        if self.marks is not None:
            (self.marks / str(key[1])).touch()
        return key


class ImageRows(Dataset):
    """Item = (a one-pixel "image", label, row) for a ``(row, sample_seed)`` key, as fgvc's image datasets give."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        return torch.full((1,), key[0]), key[0] % 3, key[0]


def collate_keys(samples: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [tuple(sample) for sample in samples]


def one_epoch_at_a_time(sampler: EpochSampler, batch_size: int, drop_last: bool, epoch: int, start: int) -> list:
    """The batches a training loader gave for one epoch, read alone, before epochs were streamed: the sampler's rule
    written out here (order, padding to equal shards, sample seeds), batched as DataLoader's own BatchSampler does."""
    g = torch.Generator().manual_seed(sampler.seed * 1_000_003 + epoch)
    order = torch.randperm(sampler.size, generator=g).tolist()
    total = -(-sampler.size // sampler.world_size) * sampler.world_size
    shard = (order * -(-total // sampler.size))[:total][sampler.rank :: sampler.world_size]
    base = (sampler.seed * 1_000_003 + epoch) * 10_000_019
    keys = [(row, (base + position * sampler.world_size + sampler.rank) % 2**31)
            for position, row in enumerate(shard) if position >= start]  # fmt: skip
    return list(torch.utils.data.BatchSampler(keys, batch_size, drop_last))


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 2)])
def test_a_span_holds_each_epochs_own_batches(drop_last: bool, rank: int, world_size: int) -> None:
    """23 images, batches of 4: every epoch's short batch stays in its epoch (kept or dropped), the first epoch of the
    span starts at a resume's position, and the sample seeds are those of a run that reads one epoch at a time."""
    sampler = EpochSampler(23, shuffle=True, seed=5, rank=rank, world_size=world_size)
    batches = EpochBatches(sampler, 4, drop_last)
    batches.span(2, 5, start=8)
    expected = [batch for epoch in range(2, 5)
                for batch in one_epoch_at_a_time(sampler, 4, drop_last, epoch, 8 if epoch == 2 else 0)]  # fmt: skip
    assert list(batches) == expected
    assert len(batches) == len(expected)
    per_epoch = [batches.batches_in(8)] + [batches.batches_in()] * 2
    assert sum(per_epoch) == len(expected)
    batches.clear_span()
    sampler.set_epoch(3)
    assert list(batches) == one_epoch_at_a_time(sampler, 4, drop_last, 3, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_gives_each_epoch_the_batches_of_its_own_iterator(workers: int) -> None:
    sampler = EpochSampler(22, shuffle=True, seed=1)
    loader = build_loader(Keys(22), 4, workers=workers, collate_fn=collate_keys,
                          batch_sampler=EpochBatches(sampler, 4, drop_last=True))  # fmt: skip
    stream = EpochStream(loader, 1, 4, start=8)
    try:
        for epoch in range(1, 4):
            read = list(stream.epoch(epoch))
            assert len(read) == (3 if epoch == 1 else 5)  # (22 - 8) // 4, then 22 // 4
            assert read == one_epoch_at_a_time(sampler, 4, True, epoch, 8 if epoch == 1 else 0)
    finally:
        stream.close()
    assert len(loader) == 5  # one epoch per iterator again
    assert epoch_batches(loader) is loader.batch_sampler


def test_workers_load_the_next_epoch_before_it_is_asked_for(tmp_path: Path) -> None:
    """The reason for the stream: once epoch 0 is read, the workers are already loading epoch 1's first batches, with
    nothing asked of epoch 1 yet. (Read one epoch per iterator, nothing of epoch 1 would load before its iter().)"""
    sampler = EpochSampler(16, shuffle=True, seed=2)
    batches = EpochBatches(sampler, 4, drop_last=True)
    loader = build_loader(Keys(16, marks=tmp_path), 4, workers=2, collate_fn=collate_keys, batch_sampler=batches)
    first_of_next = [seed for _, seed in one_epoch_at_a_time(sampler, 4, True, 1, 0)[0]]
    stream = EpochStream(loader, 0, 2)
    try:
        assert len(list(stream.epoch(0))) == 4
        deadline = time.monotonic() + 30  # a bound for a loaded machine, not a speed: it passes as soon as they exist
        while not all((tmp_path / str(seed)).exists() for seed in first_of_next) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all((tmp_path / str(seed)).exists() for seed in first_of_next)
        assert [seed for _, seed in next(iter(stream.epoch(1)))] == first_of_next
    finally:
        stream.close()


def test_epochs_are_read_in_order_and_to_their_end() -> None:
    sampler = EpochSampler(12, shuffle=True)
    loader = build_loader(Keys(12), 4, collate_fn=collate_keys, batch_sampler=EpochBatches(sampler, 4, True))
    stream = EpochStream(loader, 0, 3)
    with pytest.raises(RuntimeError, match="next epoch is 0"):
        stream.epoch(1)
    first = iter(stream.epoch(0))
    next(first)
    with pytest.raises(RuntimeError, match="epoch 0 was left after 1 of 3 batches"):
        stream.epoch(1)
    stream.close()


def test_an_evaluation_loader_is_not_a_training_stream() -> None:
    loader = build_loader(Keys(8), 4, sampler=EpochSampler(8, shuffle=False), collate_fn=collate_keys)
    with pytest.raises(TypeError, match="EpochBatches"):
        EpochStream(loader, 0, 1)


def test_a_prefetching_loader_streams_its_epochs_and_its_thread_ends_with_the_stream() -> None:
    """``decode: gpu`` wraps the loader in a Prefetcher, whose thread now runs across epoch ends: each epoch still gets
    its own batches, and closing the stream (train_stage does it on every exit) ends the thread."""
    sampler = EpochSampler(10, shuffle=True, seed=4)
    samples = ImageRows(10)
    loader = Prefetcher(build_loader(samples, 4, batch_sampler=EpochBatches(sampler, 4, drop_last=True)),
                        lambda images: images * 10, torch.device("cpu"))  # fmt: skip
    stream = EpochStream(loader, 0, 3)
    try:
        for epoch in range(2):  # a run stopped after its second epoch: the thread has the third one under way
            rows = [batch_rows.tolist() for _prepared, _labels, batch_rows in stream.epoch(epoch)]
            assert rows == [[row for row, _seed in batch] for batch in one_epoch_at_a_time(sampler, 4, True, epoch, 0)]
        assert any(thread.name == "fgvc-prefetch" for thread in threading.enumerate())
    finally:
        stream.close()
    assert not any(thread.name == "fgvc-prefetch" for thread in threading.enumerate())
