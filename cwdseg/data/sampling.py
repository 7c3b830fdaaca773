"""The training sample stream: shuffled epochs, split over ranks, resumable at any sample.

The original repeated the train list to ``num_steps x batch`` entries and shuffled it. We draw the
same kind of stream epoch by epoch with :class:`torch.utils.data.DistributedSampler` (``set_epoch``
each epoch, one shard per rank), and pair every index with its own augmentation seed. Because the
random crop/scale/mirror of a sample depend only on that seed — not on which worker loads it or on
any global RNG — a run resumed from step ``k`` sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler


class _Indices:
    """A sized stand-in for the dataset: DistributedSampler only needs ``len``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def augmentation_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """A well-mixed 32-bit seed for one sample of the stream."""
    return int(np.random.SeedSequence([seed, epoch, rank, position]).generate_state(1)[0])


class TrainSampleStream(Sampler):
    """Endless ``(index, augmentation_seed)`` pairs for one rank, starting at sample ``start``.

    Args:
        dataset_len: number of training images.
        seed: run seed; epoch ``e`` is shuffled with ``seed + e`` (DistributedSampler's rule).
        rank, world_size: this process's shard.
        start: how many samples this rank already consumed (``step x per-rank batch x grad-accum``).
    """

    def __init__(self, dataset_len: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        if dataset_len < world_size:
            raise ValueError(f"{dataset_len} training images cannot be split over {world_size} processes")
        self.dataset_len = dataset_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.per_epoch = dataset_len // world_size  # drop_last=True: every rank sees the same count

    def position(self, start: int) -> tuple[int, int]:
        """(epoch, offset within that epoch) of the ``start``-th sample of this rank."""
        return divmod(start, self.per_epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = self.position(self.start)
        sampler = DistributedSampler(
            _Indices(self.dataset_len), num_replicas=self.world_size, rank=self.rank,
            shuffle=True, seed=self.seed, drop_last=True,
        )
        while True:
            sampler.set_epoch(epoch)
            indices = list(sampler)
            for pos in range(offset, len(indices)):
                yield indices[pos], augmentation_seed(self.seed, epoch, self.rank, pos)
            offset = 0
            epoch += 1


def sample_key(key: int | tuple[int, int], length: int, needs_rng: bool) -> tuple[int, np.random.Generator | None]:
    """A dataset key -> ``(index, rng)``: ``key`` is an index or ``(index, seed)`` (the seed a
    :class:`TrainSampleStream` draws, so a sample is the same in any process). Without a seed, one is drawn
    from torch's global generator, which DataLoader seeds per worker. ``rng`` is None when nothing is random."""
    index, seed = key if isinstance(key, tuple) else (key, None)
    index = int(index)
    if not -length <= index < length:
        raise IndexError(f"index {index} out of range for {length} samples")
    if seed is None and needs_rng:
        seed = int(torch.randint(0, 2**62, ()).item())
    return index % length, (np.random.default_rng(seed) if needs_rng else None)
