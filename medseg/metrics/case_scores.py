"""Scores of one case, region by region: masks in, table rows out (no file access).

Regions
-------
By default one region ``lesion``: the reference label mapped by ``data.labels``
(:class:`medseg.config.LabelConfig`) against ``prediction > 0``. ``evaluation.regions`` replaces it
by named regions, each a set of raw reference values and optionally of predicted classes
(``prediction_values``; default: every non-zero predicted voxel), e.g. BraTS
``{whole_tumour: [1, 2, 4], tumour_core: [1, 4], enhancing: [4]}``. Each region is a "class" of
AP/mAP.

Reference lesions are the connected components of the reference mask, or with
``data.labels.instances: values`` the distinct raw values inside it (an instance-labelled
reference: touching lesions are two). Predicted lesions and their scores:
:mod:`medseg.metrics.lesion_scores`.

One (case, region) gives one ``metrics_per_case.csv`` row (voxel metrics and the ``empty`` flag
of :mod:`medseg.metrics.voxel`; lesion counts / P / R / F1 / lesion-wise Dice and recall by size
bucket of :mod:`medseg.metrics.lesion`; AP per IoU threshold; slice-level detection; score
source) and one ``lesion_matches.csv`` row per reference and per predicted lesion
(``LESION_TABLE_COLUMNS``). AP at IoU threshold ``t`` always uses the one-to-one ``iou``
matching at ``t`` (whatever ``evaluation.matching`` says, which governs the lesion P/R/F1 and
lesion Dice). The dataset summary pools these results: :mod:`medseg.metrics.summary`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cc3d
import numpy as np

from medseg.config import Config, LabelConfig
from medseg.errors import InputFileError
from medseg.geometry import bounding_box, consecutive_labels, label_components, slice_axis
from medseg.labels import map_labels
from medseg.metrics.detection import SliceCounts, average_precision, mean_ap, rank_order, slice_detection
from medseg.metrics.lesion import (
    SIZE_BUCKETS,
    LesionCounts,
    LesionMatching,
    Side,
    best_iou,
    lesion_counts,
    match_lesions,
    overlap_table,
    size_buckets,
)
from medseg.metrics.lesion_scores import ScoreSource
from medseg.metrics.voxel import VoxelMetrics, voxel_metrics

LESION_TABLE_COLUMNS = (
    "case_id", "region", "side", "lesion_id", "voxels", "volume_mm3", "size_bucket", "centroid_i",
    "centroid_j", "centroid_k", "matched", "matched_ids", "iou", "dice", "best_iou", "score",
)  # fmt: skip


@dataclass(frozen=True)
class Region:
    """One evaluated region. ``reference_values=None``: the reference mapped by ``data.labels``;
    ``prediction_values=None``: every non-zero predicted voxel."""

    name: str
    reference_values: tuple[int, ...] | None = None
    prediction_values: tuple[int, ...] | None = None


def regions_from_config(cfg: Config) -> list[Region]:
    """The regions of ``cfg.evaluation.regions``, or the single default region ``lesion``."""
    if not cfg.evaluation.regions:
        return [Region("lesion")]
    return [
        Region(
            name,
            tuple(r.reference_values),
            tuple(r.prediction_values) if r.prediction_values is not None else None,
        )
        for name, r in cfg.evaluation.regions.items()
    ]


def reference_masks(
    raw: np.ndarray, path: Path, regions: Sequence[Region], labels: LabelConfig, zero_outside: bool = False,
    n_voxels: int | None = None,
) -> list[np.ndarray]:
    """Boolean reference mask ``(I, J, K)`` of each region from the raw label array.

    Every raw value is validated against ``labels`` (integer, ``allowed_values``, plausibility)
    once. ``zero_outside``: ``raw`` is a crop and the volume around it holds value 0;
    ``n_voxels``: the whole volume's voxel count then (the foreground share is of the volume)."""
    mapped = map_labels(raw, labels, path, n_voxels)
    if zero_outside and labels.allowed_values is not None and 0 not in labels.allowed_values:
        raise InputFileError(
            path,
            f"unexpected label value(s) [0] (allowed: {sorted(labels.allowed_values)}); "
            "set data.labels.allowed_values / foreground in the config",
        )
    out = []
    for region in regions:
        if region.reference_values is None:
            out.append(mapped.astype(bool))
        else:
            out.append(np.isin(raw, np.asarray(region.reference_values, dtype=np.int64)))
    return out


def prediction_masks(pred: np.ndarray, regions: Sequence[Region]) -> list[np.ndarray]:
    """Boolean predicted mask ``(I, J, K)`` of each region from the predicted class map."""
    out = []
    for region in regions:
        if region.prediction_values is None:
            out.append(pred > 0)
        else:
            out.append(np.isin(pred, np.asarray(region.prediction_values, dtype=np.int64)))
    return out


def _zero_is_foreground(regions: Sequence[Region], labels: LabelConfig) -> bool:
    """True when some region counts value 0 as foreground (then nothing may be cropped away)."""
    for region in regions:
        ref_values = region.reference_values
        if ref_values is None:
            ref_values = () if labels.foreground == "nonzero" else tuple(labels.foreground)
        if 0 in ref_values or 0 in (region.prediction_values or ()):
            return True
    return False


def case_box(
    raw: np.ndarray, pred: np.ndarray, regions: Sequence[Region], labels: LabelConfig
) -> tuple[slice, ...]:
    """Bounding box ``(I, J, K)`` of every non-zero reference or predicted voxel (at least one
    voxel); the whole volume when value 0 can be foreground. All per-region work runs on it."""
    if _zero_is_foreground(regions, labels):
        return tuple(slice(0, n) for n in raw.shape)
    return bounding_box((raw != 0) | (pred != 0)) or tuple(slice(0, 1) for _ in raw.shape)



@dataclass(frozen=True)
class CaseArrays:
    """One case as scoring needs it (:func:`medseg.evaluation.files.read_case` reads it).

    ``reference``: raw reference label values and ``prediction``: the predicted class map
    (``0`` background, ``1..K`` classes), integer ``(I, J, K)`` on one grid with voxel-to-RAS
    ``affine`` and voxel size ``spacing`` (mm); ``scores``: the predicted lesions' score source
    on that grid; ``label_path``: the reference file that errors name."""

    case_id: str
    reference: np.ndarray
    prediction: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    scores: ScoreSource
    label_path: Path


@dataclass
class RegionResult:
    """Everything one (case, region) contributes to the tables and the dataset summary."""

    row: dict[str, Any]
    lesion_rows: list[dict[str, Any]]
    voxel: VoxelMetrics
    counts: LesionCounts
    slices: SliceCounts
    ref_buckets: np.ndarray
    ref_detected: np.ndarray
    pred_scores: np.ndarray
    pred_volumes: np.ndarray
    pred_tp: dict[float, np.ndarray]


def ap_thresholds(cfg: Config) -> list[float]:
    """The IoU thresholds AP is computed at, sorted: ``evaluation.ap_iou_thresholds`` and
    ``evaluation.iou_threshold``."""
    return sorted({*cfg.evaluation.ap_iou_thresholds, cfg.evaluation.iou_threshold})


def _centroids(labels: np.ndarray, n: int, offset: Sequence[int]) -> np.ndarray:
    """``(n, 3)`` mean voxel index (I, J, K) of lesions ``1..n`` of a label map whose first voxel
    is voxel ``offset`` of the volume (``cc3d.statistics``)."""
    if n == 0:
        return np.zeros((0, 3))
    centroids = cc3d.statistics(np.ascontiguousarray(labels))["centroids"][1 : n + 1]
    return np.asarray(centroids, dtype=np.float64) + np.asarray(offset, dtype=np.float64)


def _lesion_rows(
    matching: LesionMatching,
    labels: dict[str, np.ndarray],
    scores: np.ndarray,
    voxel_mm3: float,
    offset: Sequence[int],
    edges_mm3: Sequence[float],
) -> list[dict[str, Any]]:
    """One ``lesion_matches.csv`` row per reference and per predicted lesion (without case/region)."""
    table = matching.table
    rows: list[dict[str, Any]] = []
    sides: tuple[tuple[Side, str, np.ndarray], ...] = (
        ("ref", "reference", table.ref_sizes),
        ("pred", "prediction", table.pred_sizes),
    )
    for side, side_name, sizes in sides:
        n = sizes.size
        if n == 0:
            continue
        centroids = _centroids(labels[side], n, offset)
        partners = matching.partners(side)
        iou, dice = matching.iou(side), matching.dice(side)
        best = best_iou(table, side)
        buckets = size_buckets(sizes * voxel_mm3, edges_mm3)
        for k in range(n):
            rows.append(
                {
                    "side": side_name,
                    "lesion_id": k + 1,
                    "voxels": int(sizes[k]),
                    "volume_mm3": float(sizes[k] * voxel_mm3),
                    "size_bucket": buckets[k],
                    "centroid_i": round(float(centroids[k, 0]), 2),
                    "centroid_j": round(float(centroids[k, 1]), 2),
                    "centroid_k": round(float(centroids[k, 2]), 2),
                    "matched": bool(partners[k]),
                    "matched_ids": ";".join(str(p) for p in partners[k]),
                    "iou": float(iou[k]),
                    "dice": float(dice[k]),
                    "best_iou": float(best[k]),
                    "score": float(scores[k]) if side == "pred" else math.nan,
                }
            )
    return rows


def evaluate_region(
    case_id: str,
    region: Region,
    pred_mask: np.ndarray,
    ref_mask: np.ndarray,
    spacing: Sequence[float],
    axis: int,
    cfg: Config,
    scores: ScoreSource | None = None,
    origin: Sequence[int] = (0, 0, 0),
    outside_slices: int = 0,
    ref_instances: np.ndarray | None = None,
) -> RegionResult:
    """Metrics of one region of one case. Masks: bool ``(I, J, K)`` of one shape, voxel size
    ``spacing`` mm; ``axis``: the array axis of slice-level detection.

    The masks (and ``scores``' arrays) may be a crop of the volume that holds every non-zero
    voxel: ``origin`` is the crop's first voxel (for centroids) and ``outside_slices`` the
    slices along ``axis`` that the crop leaves out (negative in both masks: true negatives).
    ``ref_instances``: raw reference values on the same grid (``data.labels.instances: values``):
    one lesion per value."""
    ev = cfg.evaluation
    scores = scores or ScoreSource()
    voxel = voxel_metrics(pred_mask, ref_mask, spacing, distances=ev.surface_distances)
    slices = slice_detection(pred_mask, ref_mask, axis) + SliceCounts(0, 0, 0, outside_slices)
    voxel_mm3 = float(np.prod(spacing))

    box = bounding_box(pred_mask | ref_mask) or tuple(slice(0, 0) for _ in range(3))
    where = f"case {case_id}, region {region.name}"
    if ref_instances is not None:
        ref_labels, old = consecutive_labels(np.where(ref_mask[box], ref_instances[box], 0))
        n_ref = int(old.size)
    else:
        ref_labels, n_ref = label_components(ref_mask[box], ev.connectivity)
    if scores.kind == "learned":
        pred_labels, n_pred, pred_scores = scores.learned_lesions(pred_mask[box], box, where)
    else:
        pred_labels, n_pred = label_components(pred_mask[box], ev.connectivity)
        pred_scores = scores.lesion_scores(pred_labels, n_pred, box, where)
    table = overlap_table(ref_labels, pred_labels, n_ref, n_pred)
    matching = match_lesions(table, ev.matching, ev.iou_threshold)
    counts = lesion_counts(matching)
    pred_volumes = table.pred_sizes * voxel_mm3
    pred_tp = {t: match_lesions(table, "iou", t).pred_matched for t in ap_thresholds(cfg)}
    ref_buckets = size_buckets(table.ref_sizes * voxel_mm3, ev.size_edges_mm3)
    detected = matching.ref_detected

    row: dict[str, Any] = {"case_id": case_id, "region": region.name, **voxel.as_dict()}
    row.update({k if k.startswith("lesion") else f"lesion_{k}": v for k, v in counts.as_dict().items()})
    for bucket in SIZE_BUCKETS:
        in_bucket = ref_buckets == bucket
        row[f"n_ref_{bucket}"] = int(in_bucket.sum())
        row[f"recall_{bucket}"] = float(detected[in_bucket].mean()) if in_bucket.any() else math.nan
    order = rank_order(pred_scores, pred_volumes)
    for t, tp in pred_tp.items():
        row[f"ap_iou_{t:g}"] = average_precision(tp[order], n_ref)
    row["ap_mean_iou"] = mean_ap([row[f"ap_iou_{t:g}"] for t in ev.ap_iou_thresholds])
    row.update({f"slice_{k}": v for k, v in slices.as_dict().items()})
    row["score_source"] = scores.kind

    offset = [b.start + o for b, o in zip(box, origin, strict=True)]
    labels = {"ref": ref_labels, "pred": pred_labels}
    lesion_rows = [
        {"case_id": case_id, "region": region.name, **r}
        for r in _lesion_rows(matching, labels, pred_scores, voxel_mm3, offset, ev.size_edges_mm3)
    ]
    return RegionResult(
        row=row,
        lesion_rows=lesion_rows,
        voxel=voxel,
        counts=counts,
        slices=slices,
        ref_buckets=ref_buckets,
        ref_detected=detected,
        pred_scores=pred_scores,
        pred_volumes=pred_volumes,
        pred_tp=pred_tp,
    )


def score_case(case: CaseArrays, cfg: Config, regions: Sequence[Region]) -> list[RegionResult]:
    """One result per region of ``case``. Every per-region step runs on the box of :func:`case_box`;
    slice-level detection runs along ``cfg.evaluation.slice_axis`` of ``case.affine``."""
    raw, pred = case.reference, case.prediction
    axis = slice_axis(case.affine, cfg.evaluation.slice_axis)
    box = case_box(raw, pred, regions, cfg.data.labels)
    cropped = any(b.stop - b.start < n for b, n in zip(box, raw.shape, strict=True))
    ref_masks = reference_masks(raw[box], case.label_path, regions, cfg.data.labels, zero_outside=cropped,
                                n_voxels=raw.size)
    pred_masks = prediction_masks(pred[box], regions)
    origin = [b.start for b in box]
    outside = raw.shape[axis] - (box[axis].stop - box[axis].start)
    ref_instances = raw[box] if cfg.data.labels.instances == "values" else None
    return [
        evaluate_region(
            case.case_id,
            region,
            pred_mask,
            ref_mask,
            case.spacing,
            axis,
            cfg,
            case.scores.crop(box),
            origin,
            outside,
            ref_instances,
        )
        for region, ref_mask, pred_mask in zip(regions, ref_masks, pred_masks, strict=True)
    ]
