"""Lesion instances of a volume from a 2-D instance model (Mask R-CNN): per-slice detections
linked into 3-D lesions, each with the model's learned score.

Per slice (with its 2.5D context stack, whole slice at once: the model pads it to its stride)
the model returns instances ``i`` with a learned score ``s_i`` and a mask probability map
``m_i`` (:meth:`medseg.models.detection.maskrcnn.MaskRCNN.detect`). On that slice

- the probability map is ``P = max_i s_i * m_i`` -- exactly what the model's ``forward`` gives
  the dense paths (validation, ``predict_volume``), so ``P >= threshold`` is the same mask;
- a pixel belongs to the instance with the largest ``s_i * m_i`` when that value reaches
  ``threshold`` (touching instances keep their own pixels).

Linking (slice ``z`` to ``z - 1``, along the slicing axis): an instance continues a lesion of the
previous slice when the two overlap by at least ``LINK_OVERLAP`` of the smaller one's pixels;
pairs are taken one to one, largest overlap first, so two touching lesions that run side by
side through the slices stay two lesions. An instance without a partner starts a new lesion (a
lesion missing on one slice is split in two there).

Lesion score: the per-slice scores averaged with each slice's pixel count as weight
(``score_mean``), and their maximum (``score_max``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medseg.config import InferenceConfig
from medseg.geometry import bounding_box, consecutive_labels
from medseg.inference.predictor import SliceStacks, default_batch_size, evaluating
from medseg.runtime import autocast, autocast_dtype, resolve_device

LINK_OVERLAP = 0.5


@dataclass
class InstancePrediction:
    """One volume's instances on the input grid (axis order of the ``image`` given).

    ``prob``: float32 tensor, ``max_i s_i * m_i`` per voxel; ``instances``: int32 array, lesion
    ids 1..n (0 background) in the order lesions were first met along the slicing axis;
    ``score_mean`` / ``score_max``: (n,) learned scores of lesion ``k + 1`` (module docstring).
    """

    prob: torch.Tensor
    instances: np.ndarray
    score_mean: np.ndarray
    score_max: np.ndarray


def claim_pixels(scores: np.ndarray, masks: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One slice: ``scores`` (N,), ``masks`` (N, H, W) -> (P (H, W) float32, ids (H, W) int32).

    ``P = max_i scores_i * masks_i`` (0 without instances); ``ids``: 1 + the index of the instance
    with that maximum where ``P >= threshold``, else 0."""
    if scores.size == 0:
        shape = masks.shape[1:]
        return np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.int32)
    weighted = scores[:, None, None].astype(np.float32) * masks.astype(np.float32, copy=False)
    best = weighted.argmax(axis=0)
    prob = np.take_along_axis(weighted, best[None], axis=0)[0]
    ids = np.where(prob >= threshold, best + 1, 0).astype(np.int32)
    return prob, ids


def link_slices(previous: np.ndarray, current: np.ndarray, min_overlap: float = LINK_OVERLAP) -> dict[int, int]:
    """``{current id: previous id}`` of the instances of ``current`` (H, W) that continue one of
    ``previous`` (H, W): one to one, largest overlap first, overlap >= ``min_overlap`` x the
    smaller instance's pixels."""
    n_prev, n_cur = int(previous.max(initial=0)), int(current.max(initial=0))
    if n_prev == 0 or n_cur == 0:
        return {}
    both = (previous > 0) & (current > 0)
    pairs = np.bincount(current[both].astype(np.int64) * (n_prev + 1) + previous[both], minlength=(n_cur + 1) * (n_prev + 1))
    inter = pairs.reshape(n_cur + 1, n_prev + 1)
    area_cur = np.bincount(current.ravel(), minlength=n_cur + 1)
    area_prev = np.bincount(previous.ravel(), minlength=n_prev + 1)
    cur, prev = np.nonzero(inter)
    order = np.argsort(-inter[cur, prev], kind="stable")
    links: dict[int, int] = {}
    taken: set[int] = set()
    for k in order:
        c, p = int(cur[k]), int(prev[k])
        if c in links or p in taken:
            continue
        if inter[c, p] >= min_overlap * min(area_cur[c], area_prev[p]):
            links[c] = p
            taken.add(p)
    return links


class _Tracks:
    """Running 3-D lesions: per lesion the pixel count, score x pixels and maximum score."""

    def __init__(self) -> None:
        self.pixels: list[int] = []
        self.weighted: list[float] = []
        self.best: list[float] = []

    def add(self, track: int | None, pixels: int, score: float) -> int:
        if track is None:
            self.pixels.append(0)
            self.weighted.append(0.0)
            self.best.append(0.0)
            track = len(self.pixels)
        self.pixels[track - 1] += pixels
        self.weighted[track - 1] += score * pixels
        self.best[track - 1] = max(self.best[track - 1], score)
        return track

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.maximum(np.asarray(self.pixels, dtype=np.float64), 1.0)
        return np.asarray(self.weighted, dtype=np.float64) / pixels, np.asarray(self.best, dtype=np.float64)


@torch.inference_mode()
def predict_instances(
    model: nn.Module,
    image: torch.Tensor,
    context: int,
    cfg: InferenceConfig,
    device: str | torch.device | None,
    axis: int = -1,
    progress: Callable[[int], None] | None = None,
) -> InstancePrediction:
    """Instances of ``image`` (C, R, A, S) sliced normal to ``axis`` (as in ``predict_volume``);
    ``model`` has a ``detect`` method. ``cfg``: ``threshold``, ``batch_size``, ``precision``."""
    dev = resolve_device(device)
    amp = autocast_dtype(cfg.precision, dev)
    volume = image.as_tensor() if hasattr(image, "as_tensor") else image
    spatial_axis = axis % 4
    if volume.ndim != 4 or spatial_axis == 0:
        raise ValueError(f"image must be (C, R, A, S) and axis spatial, got {tuple(volume.shape)} / {axis}")
    n_slices = volume.shape[spatial_axis]
    stacks = SliceStacks(volume.to(dev), spatial_axis, context, channels_last=False)
    batch = cfg.batch_size or default_batch_size(dev)
    plane = stacks.plane
    prob = np.zeros((n_slices, *plane), dtype=np.float32)
    ids = np.zeros((n_slices, *plane), dtype=np.int32)
    tracks = _Tracks()
    previous = np.zeros(plane, dtype=np.int32)
    previous_tracks: dict[int, int] = {}
    with evaluating([model], dev):
        for start in range(0, n_slices, batch):
            stop = min(start + batch, n_slices)
            with autocast(dev, amp):
                found = model.detect(stacks(start, stop))
            for offset, det in enumerate(found):
                z = start + offset
                scores = det["scores"].float().cpu().numpy()
                slice_prob, local = claim_pixels(scores, det["masks"].float().cpu().numpy(), cfg.threshold)
                prob[z] = slice_prob
                links = link_slices(previous, local)
                pixels = np.bincount(local.ravel(), minlength=scores.size + 1)
                current_tracks: dict[int, int] = {}
                for instance in np.flatnonzero(pixels[1:]) + 1:
                    parent = links.get(int(instance))
                    track = previous_tracks.get(parent) if parent is not None else None
                    current_tracks[int(instance)] = tracks.add(track, int(pixels[instance]), float(scores[instance - 1]))
                lookup = np.zeros(scores.size + 1, dtype=np.int32)
                for instance, track in current_tracks.items():
                    lookup[instance] = track
                ids[z] = lookup[local]
                previous, previous_tracks = local, current_tracks
            if progress is not None:
                progress(stop)
    score_mean, score_max = tracks.scores()
    return InstancePrediction(
        prob=torch.movedim(torch.from_numpy(prob), 0, spatial_axis - 1),
        instances=np.moveaxis(ids, 0, spatial_axis - 1),
        score_mean=score_mean,
        score_max=score_max,
    )


def instances_in_mask(
    mask: np.ndarray, instances: np.ndarray, score_mean: np.ndarray, score_max: np.ndarray
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """The lesions of a post-processed ``mask`` (X, Y, Z) from an instance map on the same grid.

    Voxels outside the mask are dropped; mask voxels without an instance (hole filling, the
    resampling to the source grid) join the nearest instance. Lesions are renumbered 1..n in
    raster order of their first voxel (as connected-component labelling numbers them) and their
    scores follow. Returns (lesions int32, n, score_mean (n,), score_max (n,)); with no instance
    inside the mask, n = 0 and an empty map (callers fall back to connected components).
    """
    inside = mask > 0
    lesions = np.where(inside, instances, 0).astype(np.int32)
    if not lesions.any():
        return np.zeros(mask.shape, dtype=np.int32), 0, np.zeros(0), np.zeros(0)
    box = bounding_box(inside)  # every step on the lesions' bounding box, not the volume
    assert box is not None
    crop = lesions[box]
    orphans = inside[box] & (crop == 0)
    if orphans.any():
        from scipy import ndimage

        _, nearest = ndimage.distance_transform_edt(crop == 0, return_indices=True)
        crop[orphans] = crop[tuple(nearest)][orphans]
    labels, old = consecutive_labels(crop)
    out = np.zeros(mask.shape, dtype=np.int32)
    out[box] = labels
    return out, int(old.size), score_mean[old - 1], score_max[old - 1]


def drop_low_scores(
    lesions: np.ndarray, score_mean: np.ndarray, score_max: np.ndarray, min_score: float
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """Remove the lesions of ``lesions`` (ids 1..n) whose ``score_mean`` is below ``min_score``;
    the others keep their order, renumbered 1..m. Returns (lesions, m, score_mean, score_max)."""
    keep = score_mean >= min_score
    lookup = np.zeros(score_mean.size + 1, dtype=np.int32)
    lookup[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lookup[lesions], int(keep.sum()), score_mean[keep], score_max[keep]


__all__ = ["LINK_OVERLAP", "InstancePrediction", "claim_pixels", "drop_low_scores", "instances_in_mask", "link_slices",
           "predict_instances"]
