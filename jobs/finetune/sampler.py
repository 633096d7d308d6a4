"""The training sampler: one permutation per epoch over the whole dataset, sharded over ranks, that can
start anywhere in it - what lets a run resume mid-epoch with each sample seen once per epoch.

The permutation depends only on ``(seed, epoch)``, never on the number of ranks; rank ``r`` of ``W``
takes every ``W``-th sample of it from a global ``position``, so after ``k`` samples per rank the
first ``position + k * W`` samples of the permutation have been drawn, whichever rank drew them.
A resume at that position (saved in the checkpoint) draws exactly the rest. As in
``DistributedSampler``, the tail is padded with the permutation's first samples so every rank
draws as many samples (DDP needs the same number of steps on each).

Each key carries the sample's augmentation seed, a function of ``(seed, epoch, index)`` alone, so
the dataset draws the same augmentation for a sample whichever DataLoader worker, process or
restart reads it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from torch.utils.data import Sampler


class SampleKey(NamedTuple):
    """What the sampler hands the dataset: the sample's index and the seed of its augmentation."""

    index: int
    seed: int


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation in one epoch (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence((seed, epoch, index)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def epoch_order(size: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """int64 ``[size]``: the order of the dataset's indices in ``epoch`` (the same on every rank)."""
    if not shuffle:
        return np.arange(size, dtype=np.int64)
    return np.random.default_rng((seed, epoch)).permutation(size).astype(np.int64)


class EpochSampler(Sampler[SampleKey]):
    """This rank's share of an epoch's permutation from a global position.

    Args:
        size: samples in the dataset.
        rank, world_size: this rank and the number of ranks.
        seed: the run's seed (permutation and augmentation).
        shuffle: False keeps the dataset's order (still sharded and resumable).
    """

    def __init__(self, size: int, rank: int, world_size: int, seed: int, shuffle: bool = True) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.size, self.rank, self.world_size, self.seed, self.shuffle = size, rank, world_size, seed, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Draw ``epoch``'s permutation from global position ``start`` (samples already drawn by all ranks)."""
        if not 0 <= start <= self.size:
            raise ValueError(f"start must lie in [0, {self.size}], got {start}")
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return math.ceil(max(self.size - self.start, 0) / self.world_size)

    def __iter__(self) -> Iterator[SampleKey]:
        order = epoch_order(self.size, self.seed, self.epoch, self.shuffle)
        rest = order[self.start :]
        padding = len(self) * self.world_size - len(rest)
        if padding:
            rest = np.concatenate([rest, np.resize(order, padding)])
        for index in rest[self.rank :: self.world_size].tolist():
            yield SampleKey(index, augmentation_seed(self.seed, self.epoch, index))
