"""Training data: preprocessed (cached) volumes, slice index, 2.5D datasets, lesion-aware sampling,
2-D augmentation."""

from __future__ import annotations

from medseg.data.datasets import SliceDataset
from medseg.data.sampling import LesionAwareSampler
from medseg.data.slices import SliceIndex
from medseg.data.volumes import TrainVolume, fingerprint, load_volume, load_volumes
from medseg.transforms.augment import RandLesionCropd, RandModalityIntensityd, train_transforms

__all__ = [
    "LesionAwareSampler",
    "RandLesionCropd",
    "RandModalityIntensityd",
    "SliceDataset",
    "SliceIndex",
    "TrainVolume",
    "fingerprint",
    "load_volume",
    "load_volumes",
    "train_transforms",
]
