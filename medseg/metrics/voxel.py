"""Voxel-wise overlap, surface-distance and volume metrics of one binary mask pair.

Arrays are 3-D (or 2-D) boolean masks in any fixed axis order, e.g. nibabel's file index order
``(I, J, K)``; ``spacing`` gives the voxel size in mm along those same axes.

Surface definition (identical to MONAI's ``get_mask_edges`` without sub-voxels, so HD95 and ASSD
equal ``HausdorffDistanceMetric(percentile=95)`` / ``SurfaceDistanceMetric(symmetric=True)``):
the surface of a mask is the set of its voxels that have a background face neighbour
(``mask ^ binary_erosion(mask)`` with the 6-connected cross; voxels on the array border count
as surface). Distances are Euclidean in mm between voxel centres, from every surface voxel of one
mask to the nearest surface voxel of the other. HD95 = max of the two directed 95th
percentiles (linear interpolation, as ``torch.quantile``); ASSD = mean of both directed
distance sets pooled. Surfaces are found on the bounding box of both masks (plus a one-voxel
margin); nearest-surface distances come from a KD-tree over the surface voxels' mm coordinates
(exact, like MONAI's CPU path). On BraTS tumours this is about 2x faster than
``distance_transform_edt(sampling=spacing)`` on the box, and its cost follows the surface size
rather than the box volume, so scattered false positives far apart do not make it slow.

Empty-mask policy (each row carries the ``empty`` flag so such cases can be counted apart):

========================  =====  =====  =========  ======  ==========  ==========
``empty``                 Dice   IoU    precision  recall  HD95/ASSD   rel. vol.
========================  =====  =====  =========  ======  ==========  ==========
``none``                  --     --     --         --      --          --
``both``                  1      1      1          1       0           NaN
``reference`` (pred > 0)  0      0      0          NaN     NaN         NaN
``prediction`` (ref > 0)  0      0      NaN        0       NaN         -1
========================  =====  =====  =========  ======  ==========  ==========

"Both empty" scores as a perfect answer (the BraTS convention: a correct "no lesion"). NaN
marks a value that is undefined; dataset means skip NaN and report how many were skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from medseg.geometry import bounding_box

EMPTY_FLAGS = ("none", "both", "reference", "prediction")


@dataclass(frozen=True)
class VoxelMetrics:
    """Metrics of one (prediction, reference) mask pair. Volumes in mL, distances in mm."""

    dice: float
    iou: float
    precision: float
    recall: float
    hd95_mm: float
    assd_mm: float
    ref_volume_ml: float
    pred_volume_ml: float
    abs_volume_diff_ml: float
    rel_volume_diff: float
    tp_voxels: int
    fp_voxels: int
    fn_voxels: int
    empty: str

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _check_pair(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {pred.ndim}-D mask")


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a boolean mask: ``mask`` minus its 6-connected (cross) erosion.

    Voxels on the array border count as surface (erosion treats outside as background)."""
    return mask & ~ndimage.binary_erosion(mask)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: ``(pred surface -> ref surface, ref -> pred)``.

    ``pred``, ``ref``: boolean masks of one shape; both must be non-empty.
    Returns two 1-D float64 arrays, one distance per surface voxel of the first-named mask.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    _check_pair(pred, ref, spacing)
    if not pred.any() or not ref.any():
        raise ValueError("surface distances need two non-empty masks")
    box = bounding_box(pred | ref)
    assert box is not None
    # Every voxel outside the box is background in both masks, and erosion treats the array
    # border as background too, so a one-voxel zero pad reproduces the full-volume surfaces.
    pred_c = np.pad(pred[box], 1)
    ref_c = np.pad(ref[box], 1)
    scale = np.asarray(spacing, dtype=np.float64)
    pred_pts = np.argwhere(surface(pred_c)) * scale
    ref_pts = np.argwhere(surface(ref_c)) * scale
    to_ref = cKDTree(ref_pts, leafsize=32).query(pred_pts, k=1)[0]
    to_pred = cKDTree(pred_pts, leafsize=32).query(ref_pts, k=1)[0]
    return np.asarray(to_ref, dtype=np.float64), np.asarray(to_pred, dtype=np.float64)


def hd95_assd(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """``(HD95, ASSD)`` in mm of two non-empty boolean masks (see the module docstring)."""
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    hd95 = max(float(np.percentile(d_pr, 95)), float(np.percentile(d_rp, 95)))
    assd = float(np.concatenate([d_pr, d_rp]).mean())
    return hd95, assd


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def voxel_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], distances: bool = True
) -> VoxelMetrics:
    """All voxel metrics of one pair of boolean masks (same shape, voxel size ``spacing`` mm).

    ``distances=False`` skips HD95/ASSD (reported as NaN) for speed.
    The empty-mask policy is the table in the module docstring.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    _check_pair(pred, ref, spacing)
    box = bounding_box(pred | ref)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    if box is None:
        tp = fp = fn = 0
    else:
        p, r = pred[box], ref[box]
        tp = int(np.count_nonzero(p & r))
        n_pred = int(np.count_nonzero(p))
        n_ref = int(np.count_nonzero(r))
        fp, fn = n_pred - tp, n_ref - tp
    n_pred, n_ref = tp + fp, tp + fn
    ref_ml, pred_ml = n_ref * voxel_ml, n_pred * voxel_ml
    nan = float("nan")
    if n_ref == 0 and n_pred == 0:
        return VoxelMetrics(1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, nan, 0, 0, 0, "both")
    empty = "reference" if n_ref == 0 else "prediction" if n_pred == 0 else "none"
    dice = 2.0 * tp / (n_pred + n_ref)
    iou = tp / (tp + fp + fn)
    precision = _ratio(tp, n_pred)
    recall = _ratio(tp, n_ref)
    if empty == "none" and distances:
        hd95, assd = hd95_assd(pred, ref, spacing)
    else:
        hd95, assd = nan, nan
    return VoxelMetrics(
        dice=dice,
        iou=iou,
        precision=precision,
        recall=recall,
        hd95_mm=hd95,
        assd_mm=assd,
        ref_volume_ml=ref_ml,
        pred_volume_ml=pred_ml,
        abs_volume_diff_ml=abs(pred_ml - ref_ml),
        rel_volume_diff=_ratio(pred_ml - ref_ml, ref_ml),
        tp_voxels=tp,
        fp_voxels=fp,
        fn_voxels=fn,
        empty=empty,
    )


def global_dice(tp: Sequence[int], fp: Sequence[int], fn: Sequence[int]) -> float:
    """Dice over all voxels of all cases pooled (LiTS "Dice global"):
    ``2·ΣTP / Σ(|P| + |R|)``; 1 when every mask of every case is empty."""
    tp_sum = float(np.sum(tp))
    den = 2.0 * tp_sum + float(np.sum(fp)) + float(np.sum(fn))
    return 2.0 * tp_sum / den if den > 0 else 1.0
