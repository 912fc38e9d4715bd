"""Lesion-aware slice sampling, deterministic per (seed, epoch) and sharded across ranks.

Each epoch is a list of batches. Every batch holds ``round(batch_size * lesion_fraction)``
slices drawn from slices with lesion and the rest from slices without (when one of the two
pools is empty, the other fills the batch). Within each pool, slices are drawn from
successive random permutations, so an epoch visits a pool's slices evenly before repeating.

The plan of an epoch depends only on ``(seed, epoch)``: rank ``r`` of ``world_size`` takes the
batches ``r, r + world_size, ...`` of one global plan (``DistributedSampler``-style sharding
without overlap), and every sample carries its own augmentation seed, so the samples — and
their augmentation — do not depend on the number of DataLoader workers, and resuming at an
epoch boundary replays the same data.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def _draw(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` items of ``pool`` from successive random permutations of it."""
    if n == 0 or pool.size == 0:
        return pool[:0]
    reps = -(-n // pool.size)
    return np.concatenate([rng.permutation(pool) for _ in range(reps)])[:n]


class LesionAwareSampler(Sampler[tuple[int, int]]):
    """Yields ``(index position, sample seed)`` pairs, ``num_batches * batch_size`` per epoch.

    ``lesion``: (N,) bool, one flag per ``SliceIndex`` position. ``num_batches``: batches per
    rank and epoch. Use with ``DataLoader(sampler=..., batch_size=batch_size)`` so the loader's
    batches are the planned ones. Call ``set_epoch`` before each epoch.
    """

    def __init__(
        self,
        lesion: np.ndarray,
        batch_size: int,
        num_batches: int,
        lesion_fraction: float,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        lesion = np.asarray(lesion, dtype=bool)
        if lesion.size == 0:
            raise ValueError("cannot sample from an empty slice index")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.lesion_pool = np.flatnonzero(lesion)
        self.other_pool = np.flatnonzero(~lesion)
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.lesion_fraction = lesion_fraction
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def plan(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's epoch: positions and seeds, each (num_batches, batch_size) int64."""
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.num_batches * self.world_size
        n_lesion = round(self.batch_size * self.lesion_fraction)
        if self.lesion_pool.size == 0:
            n_lesion = 0
        elif self.other_pool.size == 0:
            n_lesion = self.batch_size
        lesion = _draw(self.lesion_pool, total * n_lesion, rng).reshape(total, n_lesion)
        other = _draw(self.other_pool, total * (self.batch_size - n_lesion), rng).reshape(total, -1)
        batches = rng.permuted(np.concatenate([lesion, other], axis=1), axis=1)
        seeds = rng.integers(0, 2**31 - 1, size=batches.shape, dtype=np.int64)
        return batches[self.rank :: self.world_size], seeds[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        positions, seeds = self.plan()
        yield from zip(positions.ravel().tolist(), seeds.ravel().tolist(), strict=True)
