"""Slice index: every training slice of every volume, with its lesion statistics.

The index is the unit of sampling: position ``i`` names slice ``slice[i]`` of volume
``case[i]``. Per-slice lesion voxels come from ``medseg.stats.lesions.case_lesion_stats`` on the
slice-major label (axis 0), so sampling and ``medseg stats`` count lesions the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medseg.data.volumes import TrainVolume
from medseg.stats.lesions import case_lesion_stats


@dataclass(frozen=True)
class SliceIndex:
    """Flat index over the slices of several volumes.

    ``case``: (N,) int64 volume position; ``slice``: (N,) int64 slice within it;
    ``lesion_voxels``: (N,) int64 lesion voxels on that slice.
    """

    case: np.ndarray
    slice: np.ndarray
    lesion_voxels: np.ndarray

    def __len__(self) -> int:
        return int(self.case.shape[0])

    @property
    def lesion(self) -> np.ndarray:
        """(N,) bool: the slice holds lesion."""
        return self.lesion_voxels > 0

    @classmethod
    def from_volumes(cls, volumes: Sequence[TrainVolume], connectivity_2d: int = 8) -> SliceIndex:
        """Index every slice of ``volumes`` (label (S, H, W), spacing along (S, H, W))."""
        cases, slices, voxels = [], [], []
        for position, volume in enumerate(volumes):
            stats = case_lesion_stats(
                (volume.label > 0).numpy(), volume.spacing, axis=0, connectivity_2d=connectivity_2d
            ).slices
            n = len(stats)
            cases.append(np.full(n, position, dtype=np.int64))
            slices.append(stats["slice"].to_numpy(dtype=np.int64))
            voxels.append(stats["lesion_voxels"].to_numpy(dtype=np.int64))
        if not cases:
            empty = np.zeros(0, dtype=np.int64)
            return cls(empty, empty, empty)
        return cls(np.concatenate(cases), np.concatenate(slices), np.concatenate(voxels))
