"""2.5D slice dataset over preprocessed volumes.

A sample is the indexed slice plus ``context`` neighbours on each side, for every channel
(``medseg.transforms.preprocessing.context_stack``: neighbour offset major, channel minor, edges
replicated), and its label slice -- or, for a volume with a ``soft_label`` (distillation), that
slice of the teacher's probability -- then the (seeded) augmentation chain.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import Compose
from torch.utils.data import Dataset

from medseg.data.slices import SliceIndex
from medseg.data.volumes import TrainVolume
from medseg.transforms.preprocessing import context_stack


class SliceDataset(Dataset):
    """``dataset[position]`` or ``dataset[(position, seed)]`` ->
    ``{"image": (C*(2k+1), h, w) float32, "label": (1, h, w) float32 0/1}`` (``label`` in [0, 1]:
    the teacher's probability, for a volume with a ``soft_label``).

    ``h, w`` is the volume's in-plane size, or the patch size when ``transform`` crops. With a
    seed, ``transform`` is re-seeded first, so the sample is a pure function of
    ``(position, seed)`` (what ``LesionAwareSampler`` yields).
    """

    def __init__(
        self,
        volumes: Sequence[TrainVolume],
        index: SliceIndex,
        context: int,
        transform: Compose | None = None,
    ) -> None:
        self.volumes = list(volumes)
        self.index = index
        self.context = context
        self.transform = transform

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        position, seed = key if isinstance(key, tuple) else (key, None)
        volume = self.volumes[int(self.index.case[position])]
        z = int(self.index.slice[position])
        data = {
            "image": context_stack(volume.image, z, self.context, axis=1),
            "label": volume.label[z][None].to(torch.float32),
        }
        if volume.soft_label is not None:  # a copy: the chain must never write into the volume
            data["label"] = volume.soft_label[z][None].to(torch.float32, copy=True)
        if self.transform is not None:
            if seed is not None:
                self.transform.set_random_state(seed=int(seed))
            tracking = get_track_meta()
            set_track_meta(False)  # plain tensors: MONAI's metadata bookkeeping doubles the cost
            try:
                data = self.transform(data)
            finally:
                set_track_meta(tracking)
        return {"image": torch.as_tensor(data["image"]).contiguous(), "label": torch.as_tensor(data["label"])}
