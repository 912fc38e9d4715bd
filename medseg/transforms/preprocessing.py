"""Preprocessing shared by training and inference: one definition, so they cannot drift.

``preprocess_transforms(cfg, modality, channels, with_label)`` builds the MONAI dict chain

    LoadVolumed -> CheckSameGridd -> MapLabelsd -> EnsureChannelFirstd -> ConcatItemsd("image")
    -> Orientationd("RAS") -> [Spacingd in-plane] -> ForegroundMaskd + CropForegroundd
    -> NormalizeCTd | NormalizeMRd -> EnsureTyped(float32 image, uint8 label)

Output dict: ``image`` MetaTensor (C, R, A, S) float32 with C = number of channels in manifest
order; ``label`` (1, R, A, S) uint8 0/1 when ``with_label``. All spatial steps are MONAI
invertible transforms, so ``monai.transforms.Invertd`` (or ``invert_to_source``) maps a
prediction made on this grid back to the source image's grid.

Intensity normalisation
-----------------------
- CT: clip to ``ct_window`` (HU), scale to [0, 1].
- MR: per channel, clip to the ``mr_percentiles`` of the foreground voxels, then z-score with
  the foreground mean and std (robust to saturated outliers such as BraTS FLAIR's 32767).

Foreground (body/brain): CT voxels above ``ct_body_hu``; MR voxels above the channel minimum
when the minimum fills more than 5% of the volume (skull-stripped or zero-padded data), else
above the Otsu threshold. The crop keeps ``crop_margin`` voxels around the foreground.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    ConcatItemsd,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    Spacingd,
)

from medseg.config import LabelConfig, PreprocessConfig
from medseg.geometry import AXIS_INDEX
from medseg.transforms.loading import CheckSameGridd, LoadVolumed, MapLabelsd

IMAGE_KEY = "image"
LABEL_KEY = "label"
FOREGROUND_KEY = "foreground"


def channel_key(channel: str) -> str:
    return f"{IMAGE_KEY}_{channel}"


def foreground_mask(image: np.ndarray | torch.Tensor, modality: str, ct_body_hu: float = -500.0) -> np.ndarray:
    """Body/brain mask (bool, spatial shape) of a (C, ...) image before normalisation.

    CT: any channel above ``ct_body_hu``. MR: per channel above its minimum when the minimum
    fills > 5% of the volume, else above its Otsu threshold; union over channels.
    """
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if modality.upper() == "CT":
        return (arr > ct_body_hu).any(axis=0)
    masks = map_channels(_mr_channel_foreground, list(arr))
    mask = masks[0]
    for other in masks[1:]:
        mask |= other
    return mask


def map_channels(fn: Callable[..., Any], channels: Sequence[Any], *args: Any) -> list[Any]:
    """``[fn(channel, *args) for channel in channels]``, one thread per channel when there are
    several (channels are independent; numpy's reductions, comparisons, percentiles and copies
    release the GIL)."""
    if len(channels) == 1:
        return [fn(channels[0], *args)]
    with ThreadPoolExecutor(max_workers=len(channels), thread_name_prefix="medseg-channel") as pool:
        return list(pool.map(lambda channel: fn(channel, *args), channels))


def _mr_channel_foreground(channel: np.ndarray) -> np.ndarray:
    """One MR channel's foreground (``foreground_mask``): above its minimum when the minimum fills
    > 5% of the volume (skull-stripped or masked images), else above its Otsu threshold."""
    from skimage.filters import threshold_otsu

    low = channel.min()
    sub = channel[::2, ::2, ::2] if channel.ndim == 3 else channel
    if np.count_nonzero(sub == low) > 0.05 * sub.size:
        return channel > low
    hi = np.percentile(sub, 99.5)
    threshold = threshold_otsu(np.clip(sub, low, hi).ravel()) if hi > low else low
    return channel > threshold


class NormalizeCTd(MapTransform):
    """CT: clip to a HU window and scale to [0, 1]. Input/output (C, ...) float.

    The same values as MONAI's ``ScaleIntensityRanged(clip=True)``, 2.5-6.5x faster on a
    512 x 512 x 120 CT (in-place ops on one float32 copy, no per-op MetaTensor tracking;
    ``benchmarks/bench_ct_normalise.py``, docs/benchmarks.md)."""

    def __init__(self, keys: KeysCollection, window: Sequence[float]) -> None:
        super().__init__(keys)
        self.low, self.high = float(window[0]), float(window[1])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = plain_float32(d[key])
            x.clamp_(self.low, self.high).sub_(self.low).div_(self.high - self.low)
            d[key] = like_input(x, d[key])
        return d


def plain_float32(value: Any) -> torch.Tensor:
    """A float32 copy of ``value`` as a plain tensor (arithmetic on a MetaTensor goes through
    MONAI's ``__torch_function__``, which tracks meta data at every op)."""
    x = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
    return x.to(torch.float32, copy=True)


def like_input(result: torch.Tensor, value: Any) -> torch.Tensor:
    """``result`` with ``value``'s meta data and applied operations when ``value`` is a MetaTensor."""
    if isinstance(value, MetaTensor):
        return MetaTensor(result, meta=dict(value.meta), applied_operations=list(value.applied_operations))
    return result


class NormalizeMRd(MapTransform):
    """MR: per channel, clip to foreground percentiles, z-score with foreground mean/std.

    Input/output (C, ...) float. Voxels outside the foreground are normalised with the same
    statistics (not zeroed), so background stays distinguishable from average tissue.
    """

    def __init__(self, keys: KeysCollection, percentiles: Sequence[float] = (0.5, 99.5)) -> None:
        super().__init__(keys)
        self.percentiles = (float(percentiles[0]), float(percentiles[1]))

    def _normalise_channel(self, channel: torch.Tensor, fg: np.ndarray | None) -> None:
        """One (...) float32 channel in place; ``fg``: its foreground (bool, same shape) or None = all."""
        # numpy's boolean indexing: the same values in the same order as torch's, ~10x faster
        values = torch.from_numpy(channel.numpy()[fg]) if fg is not None else channel.reshape(-1)  # a copy, or channel itself
        sample = values[:: max(1, values.numel() // 2_000_000)].numpy()
        lo, hi = (float(v) for v in np.percentile(sample, self.percentiles))
        inside = values.clamp_(lo, hi)  # the clipped foreground
        mean, std = float(inside.mean()), float(inside.std())
        channel.clamp_(lo, hi).sub_(mean).div_(std if std > 1e-6 else 1.0)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = plain_float32(d[key])  # our copy: normalised in place
            fg = foreground_mask(x, "MR")
            map_channels(self._normalise_channel, x.unbind(0), fg if fg.any() else None)
            d[key] = like_input(x, d[key])
        return d


def foreground_as_numpy(mask: torch.Tensor) -> np.ndarray:
    """``CropForegroundd``'s ``select_fn`` for the bool ``foreground`` mask: the mask itself as a
    numpy array, so MONAI's bounding box reduces it with numpy (a 512x512x200 CT: 38 ms instead
    of 155 ms with torch's multi-axis ``any``, and no ``mask > 0`` on a MetaTensor)."""
    return (mask.as_tensor() if isinstance(mask, MetaTensor) else torch.as_tensor(mask)).numpy()


class ForegroundMaskd(MapTransform):
    """Adds ``foreground`` (1, ...) bool: the body/brain mask of the raw ``image`` (see module doc)."""

    def __init__(self, modality: str, ct_body_hu: float) -> None:
        super().__init__([IMAGE_KEY])
        self.modality = modality
        self.ct_body_hu = ct_body_hu

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = foreground_mask(d[IMAGE_KEY], self.modality, self.ct_body_hu)
        if not mask.any():  # nothing above threshold: keep the whole volume
            mask[...] = True
        d[FOREGROUND_KEY] = torch.from_numpy(mask)[None]
        return d


def preprocess_transforms(
    cfg: PreprocessConfig,
    modality: str,
    channels: Sequence[str],
    with_label: bool,
    label_cfg: LabelConfig | None = None,
    label_values: bool = False,
) -> Compose:
    """The chain documented in the module docstring.

    Input dict: ``image_<channel>`` -> file path for each channel, and ``label`` -> path when
    ``with_label``. Output: ``image`` (C, R, A, S) float32, ``label`` (1, R, A, S) uint8 0/1, or
    with ``label_values`` int32 raw values on the lesion voxels (instance-labelled references).
    """
    keys = [channel_key(c) for c in channels]
    all_keys = [*keys, *([LABEL_KEY] if with_label else [])]
    spatial = [IMAGE_KEY, *([LABEL_KEY] if with_label else [])]
    # the files' own dtype (e.g. int16) through concatenation, orientation and crop: half the
    # memory traffic of float32, and normalisation makes its float32 copy anyway (same values)
    chain: list[Any] = [LoadVolumed(all_keys, dtype=None), CheckSameGridd(all_keys)]
    if with_label:
        chain.append(MapLabelsd([LABEL_KEY], label_cfg, keep_values=label_values))
    chain += [
        EnsureChannelFirstd(all_keys, channel_dim="no_channel"),
        ConcatItemsd(keys, IMAGE_KEY),
        DeleteItemsd(keys),
        Orientationd(spatial, axcodes="RAS", labels=None),
    ]
    if cfg.spacing_inplane is not None:
        sx, sy = cfg.spacing_inplane
        pixdim = {"axial": [sx, sy, -1.0], "coronal": [sx, -1.0, sy], "sagittal": [-1.0, sx, sy]}[cfg.slice_axis]
        # a pixdim <= 0 keeps that axis' spacing (the slice spacing is never resampled)
        chain.append(Spacingd(spatial, pixdim=pixdim, mode=["bilinear", "nearest"][: len(spatial)], dtype=np.float32))
    if cfg.crop_foreground:
        margin = [cfg.crop_margin] * 3
        margin[AXIS_INDEX[cfg.slice_axis]] = cfg.crop_margin_slices
        chain += [
            ForegroundMaskd(modality, cfg.ct_body_hu),
            CropForegroundd(spatial, source_key=FOREGROUND_KEY, select_fn=foreground_as_numpy, margin=margin, allow_smaller=True),
            DeleteItemsd([FOREGROUND_KEY]),
        ]
    if modality.upper() == "CT":
        chain.append(NormalizeCTd([IMAGE_KEY], cfg.ct_window))
    else:
        chain.append(NormalizeMRd([IMAGE_KEY], cfg.mr_percentiles))
    chain.append(EnsureTyped([IMAGE_KEY], dtype=torch.float32, track_meta=True))
    if with_label:
        chain.append(EnsureTyped([LABEL_KEY], dtype=torch.int32 if label_values else torch.uint8, track_meta=True))
    return Compose(chain)


def context_stack(volume: torch.Tensor, index: int | Sequence[int] | torch.Tensor, context: int, axis: int = -1) -> torch.Tensor:
    """2.5D input: slice(s) ``index`` with ``context`` neighbours on each side as channels.

    ``volume``: (C, R, A, S) (slices along ``axis``, default the last = axial). Returns
    (C * (2*context + 1), H, W) for an int index, (N, C * (2*context + 1), H, W) for several.
    Channel order: neighbour offset major, modality minor — [z-k: c0..cC-1, ..., z+k: ...].
    Edge slices are padded by replication (index clamped to the volume).
    """
    vol = torch.movedim(volume, axis, 1)  # (C, S, H, W)
    n = vol.shape[1]
    single = isinstance(index, int)
    idx = torch.as_tensor([index] if single else index, dtype=torch.long)
    offsets = torch.arange(-context, context + 1)
    neighbours = (idx[:, None] + offsets[None, :]).clamp(0, n - 1)  # (N, 2k+1)
    stack = vol[:, neighbours]  # (C, N, 2k+1, H, W)
    stack = stack.permute(1, 2, 0, 3, 4).reshape(len(idx), -1, vol.shape[2], vol.shape[3])
    return stack[0] if single else stack
