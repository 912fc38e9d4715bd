"""2-D training augmentation: MONAI ``Rand*d`` transforms on one 2.5D sample.

A sample is ``{"image": (C, H, W) float32, "label": (1, H, W) float32 0/1}`` (C = channels x
(2k+1) context slices; H, W the in-plane axes). Spatial transforms move image and label
together (bilinear for the image, nearest for the label); intensity transforms touch only
the image. The chain is

    SpatialPadd (to the patch size; image edge-replicated, label zero)
    -> RandLesionCropd (patch, lesion-centred for lesion slices; may reach ``translate`` x the
       patch beyond the slice border, edge-replicated, so content lands at every offset)
    -> RandFlipd per axis -> RandAffined (rotation, zoom) -> Rand2DElasticd
    -> RandModalityIntensityd (scale and shift per modality) -> RandAdjustContrastd (gamma)
    -> RandGaussianNoised -> RandGaussianSmoothd -> EnsureTyped (plain tensors)

``SliceDataset`` seeds the chain per sample (``set_random_state(seed)``), so a sample's
augmentation is fixed by its seed whatever process or worker draws it. The chain is a
``SharedRandomCompose``: its random transforms draw from one ``RandomState``, so re-seeding
costs one generator, not one per transform.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandomizableTransform,
    SpatialPadd,
)

from medseg.config import AugmentConfig

IMAGE = "image"
LABEL = "label"


class RandLesionCropd(Randomizable, MapTransform):
    """Crop ``keys`` (each (C, H, W), at least ``size``) to ``size`` = (h, w).

    With probability ``lesion_prob``, when ``label_key`` holds lesion, the crop is centred on
    a random lesion pixel (shifted to stay inside the allowed range); otherwise its position is
    uniform. ``margin`` = (mh, mw): the crop may reach up to that many pixels beyond each border
    of the slice. The part outside is filled per key by ``pad_modes`` ("replicate": edge pixels,
    for images; "constant": 0, for labels). Without a margin, a patch nearly as large as the
    slice (e.g. 160x192 from a 162x191 foreground-cropped BraTS slice) always sits at the same
    offset: the network then learns one alignment of the anatomy to its pooling grid and to the
    patch border, and its masks change when inference pads or tiles the slice differently.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str,
        size: Sequence[int],
        lesion_prob: float,
        margin: Sequence[int] = (0, 0),
        pad_modes: Sequence[str] | str = "replicate",
    ) -> None:
        MapTransform.__init__(self, keys)
        self.label_key = label_key
        self.size = (int(size[0]), int(size[1]))
        self.lesion_prob = lesion_prob
        self.margin = (int(margin[0]), int(margin[1]))
        if min(self.margin) < 0:
            raise ValueError(f"RandLesionCropd: margin must be >= 0, got {margin}")
        modes = [pad_modes] * len(self.keys) if isinstance(pad_modes, str) else list(pad_modes)
        if len(modes) != len(self.keys):
            raise ValueError(f"RandLesionCropd: {len(modes)} pad modes for {len(self.keys)} keys")
        self.pad_modes = dict(zip(self.keys, modes, strict=True))

    def randomize(self, label: torch.Tensor) -> tuple[int, int]:
        """Top-left corner of the crop in slice pixels (negative = beyond the top/left border)."""
        h, w = label.shape[-2:]
        ph, pw = self.size
        mh, mw = self.margin
        if h < ph or w < pw:
            raise ValueError(f"RandLesionCropd: input {h}x{w} is smaller than the patch {ph}x{pw}; pad first")
        use_lesion = self.R.random_sample() < self.lesion_prob
        if use_lesion:
            ys, xs = torch.nonzero(label.reshape(-1, h, w).amax(dim=0) > 0, as_tuple=True)
            if ys.numel():
                k = int(self.R.randint(ys.numel()))
                top = min(max(int(ys[k]) - ph // 2, -mh), h - ph + mh)
                left = min(max(int(xs[k]) - pw // 2, -mw), w - pw + mw)
                return top, left
        return int(self.R.randint(-mh, h - ph + mh + 1)), int(self.R.randint(-mw, w - pw + mw + 1))

    def _crop(self, x: torch.Tensor, top: int, left: int, mode: str) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = self.size
        r0, c0 = max(top, 0), max(left, 0)
        r1, c1 = min(top + ph, h), min(left + pw, w)
        inside = x[..., r0:r1, c0:c1]
        pads = [c0 - left, left + pw - c1, r0 - top, top + ph - r1]
        if not any(pads):
            return inside
        flat = torch.as_tensor(inside).reshape(-1, r1 - r0, c1 - c0)
        padded = torch.nn.functional.pad(flat, pads, mode=mode)
        return padded.reshape(*inside.shape[:-2], ph, pw)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        top, left = self.randomize(d[self.label_key])
        for key in self.key_iterator(d):
            d[key] = self._crop(d[key], top, left, self.pad_modes[key])
        return d


class RandModalityIntensityd(RandomizableTransform, MapTransform):
    """With probability ``prob``, scale and shift each modality of a 2.5D stack by its own draw.

    ``keys`` hold (C * (2k + 1), H, W) stacks in ``context_stack`` order (neighbour major,
    modality minor): channel ``i`` belongs to modality ``i % n_modalities``. Every context slice
    of a modality gets the same factor ``1 + U(-scale, scale)`` and offset ``U(-shift, shift)``
    (one volume's slices share their scanner and normalisation; the modalities do not).
    """

    def __init__(self, keys: KeysCollection, n_modalities: int, scale: float, shift: float, prob: float) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.n_modalities = n_modalities
        self.scale = scale
        self.shift = shift

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        m = self.n_modalities
        factor = torch.as_tensor(1.0 + self.R.uniform(-self.scale, self.scale, size=m), dtype=torch.float32)
        offset = torch.as_tensor(self.R.uniform(-self.shift, self.shift, size=m), dtype=torch.float32)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            n = x.shape[0]
            if n % m:
                raise ValueError(f"RandModalityIntensityd: {n} channels are not a multiple of {m} modalities")
            reps = n // m
            d[key] = x * factor.repeat(reps)[:, None, None] + offset.repeat(reps)[:, None, None]
        return d


class SharedRandomCompose(Compose):
    """``Compose`` whose random transforms all share the chain's ``RandomState`` ``R``.

    ``set_random_state(seed)`` re-seeds that one generator; the draws of the whole chain are
    then fixed by the seed (the transforms consume it in chain order).
    """

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> Compose:
        Randomizable.set_random_state(self, seed, state)
        for transform in self.transforms:
            if isinstance(transform, Randomizable):
                transform.set_random_state(state=self.R)
        return self


def crop_margin(cfg: AugmentConfig, patch_size: Sequence[int]) -> tuple[int, int]:
    """Pixels the training crop may reach beyond each slice border: ``translate`` x the patch
    size (0 when augmentation is off)."""
    if not cfg.enabled:
        return (0, 0)
    return (round(cfg.translate * patch_size[0]), round(cfg.translate * patch_size[1]))


def train_transforms(
    cfg: AugmentConfig, patch_size: Sequence[int], lesion_crop_prob: float, n_modalities: int = 1
) -> SharedRandomCompose:
    """The training chain of the module docstring, built from ``train.augment``.

    ``n_modalities``: input channels before 2.5D stacking (the manifest's channels)."""
    keys = [IMAGE, LABEL]
    chain: list[Any] = [
        SpatialPadd(keys, spatial_size=tuple(patch_size), mode=("edge", "constant")),
        RandLesionCropd(keys, LABEL, patch_size, lesion_crop_prob, crop_margin(cfg, patch_size), ("replicate", "constant")),
    ]
    if cfg.enabled:
        chain += [RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=axis) for axis in sorted(set(cfg.flip_axes))]
        if cfg.affine_prob > 0:
            chain.append(
                RandAffined(
                    keys,
                    prob=cfg.affine_prob,
                    rotate_range=(math.radians(cfg.rotate_deg),),
                    scale_range=(cfg.scale, cfg.scale),
                    mode=("bilinear", "nearest"),
                    padding_mode="border",
                )
            )
        if cfg.elastic_prob > 0:
            chain.append(
                Rand2DElasticd(
                    keys,
                    spacing=(cfg.elastic_spacing, cfg.elastic_spacing),
                    magnitude_range=cfg.elastic_magnitude,
                    prob=cfg.elastic_prob,
                    mode=("bilinear", "nearest"),
                    padding_mode="border",
                )
            )
        if cfg.intensity_prob > 0:
            chain.append(
                RandModalityIntensityd(
                    IMAGE, n_modalities, cfg.intensity_scale, cfg.intensity_shift, cfg.intensity_prob
                )
            )
        if cfg.contrast_prob > 0:
            chain.append(RandAdjustContrastd(IMAGE, gamma=cfg.gamma, prob=cfg.contrast_prob))
        if cfg.noise_prob > 0:
            chain.append(RandGaussianNoised(IMAGE, std=cfg.noise_std, prob=cfg.noise_prob))
        if cfg.blur_prob > 0:
            chain.append(
                RandGaussianSmoothd(IMAGE, sigma_x=cfg.blur_sigma, sigma_y=cfg.blur_sigma, prob=cfg.blur_prob)
            )
    chain.append(EnsureTyped(keys, dtype=torch.float32, track_meta=False))
    return SharedRandomCompose(chain)
