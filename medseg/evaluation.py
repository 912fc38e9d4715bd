"""Evaluate a folder of predicted masks against the manifest's reference labels (files -> tables).

The prediction folder's files and the tables written here are named in :mod:`medseg.outputs`
(the contract): per case a mask (required), a probability map and a lesion instance map with
its table (optional).

Detection score of a predicted lesion (used to rank lesions for AP): with an instance model's
outputs (the lesion table's ``score_source`` is ``learned``, Mask R-CNN), the predicted lesions
**are** the instances of the ``_lesions`` map (touching lesions stay apart) and each scores its
learned ``score_mean`` (``"score_source": "learned"``); otherwise lesions are the connected
components of the mask, scored by the ``score_mean`` of the
instance that overlaps it most (ties: lower id) when the instance map and CSV both exist; else
the mean of ``_prob`` inside the lesion; else there is no score -- every lesion scores 1, the
ranking falls back to lesion volume (larger first), and ``summary.json`` says
``"score_source": "none"`` so nobody mistakes that AP for a ranked one. Each case records its
source in ``metrics_per_case.csv``; ``summary.json`` reports the source of the cases with
predicted lesions, ``mixed`` when they differ.

Reference lesions are the connected components of the reference mask, or with
``data.labels.instances: values`` the distinct raw values inside it (an instance-labelled
reference: touching lesions are two).

Regions
-------
By default one region ``lesion``: the reference label mapped by ``data.labels``
(:class:`medseg.config.LabelConfig`) against ``prediction > 0``. ``evaluation.regions`` replaces it
by named regions, each a set of raw reference values and optionally of predicted classes
(``prediction_values``; default: every non-zero predicted voxel), e.g. BraTS
``{whole_tumour: [1, 2, 4], tumour_core: [1, 4], enhancing: [4]}``. Each region is a "class" of
AP/mAP.

Outputs (in ``out_dir``)
------------------------
- ``metrics_per_case.csv``: one row per (case, region): voxel metrics and the ``empty`` flag
  (:mod:`medseg.metrics.voxel`), lesion counts / P / R / F1 / lesion-wise Dice and recall by
  size bucket (:mod:`medseg.metrics.lesion`), per-case AP per IoU threshold, slice-level
  detection counts, sensitivity and specificity, score source.
- ``lesion_matches.csv``: one row per reference and per predicted lesion: case, region, side,
  lesion id, size (voxels, mm³), size bucket, centroid (voxel indices I, J, K), matched partner
  ids, IoU and Dice with the partners, best single-lesion IoU, score.
- ``pr_curve.csv``: per region and IoU threshold, the dataset-wide ranking: class,
  iou_threshold, rank, score, precision, recall (plus case_id, lesion_id, tp).
- ``summary.json``: the configuration used, case counts, per-region mean / median / std of each
  metric (NaN skipped and counted), global Dice, empty-mask counts, pooled lesion metrics,
  recall by size, AP per threshold, mAP per threshold and over thresholds, slice detection.
- ``failures.csv``: one row (case_id, error) per case that could not be evaluated (missing or
  unreadable prediction or reference, grid mismatch, non-integer predicted mask...); header only
  when none failed. The tables and the summary cover the other cases; ``summary.json`` counts
  the failed ones (``n_failed``, ``failures``). ``medseg evaluate`` without a split scores the
  cases that have a predicted mask: a labelled case without one is not a failure but listed in
  ``summary.json`` (``n_not_predicted``, ``not_predicted``).

Lesion tables, AP rankings and slice counts are pooled over all evaluated cases; per-case means
are reported alongside. AP at IoU threshold ``t`` always uses the one-to-one ``iou`` matching at
``t`` (whatever ``evaluation.matching`` says, which governs the lesion P/R/F1 and lesion Dice).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
import pandas as pd
from tqdm import tqdm

from medseg import __version__, atomic
from medseg.config import Config, LabelConfig
from medseg.errors import InputFileError, ManifestError, MedsegError
from medseg.geometry import bounding_box, consecutive_labels, label_components, slice_axis
from medseg.io import Volume, check_same_grid, read_volume
from medseg.labels import map_labels
from medseg.manifest import Case, case_id_problem, read_manifest
from medseg.metrics.detection import (
    SliceCounts,
    average_precision,
    mean_ap,
    precision_recall,
    rank_order,
    slice_detection,
)
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
from medseg.metrics.voxel import EMPTY_FLAGS, VoxelMetrics, global_dice, voxel_metrics
from medseg.outputs import (
    EVAL_LESION_MATCHES,
    EVAL_PER_CASE,
    EVAL_PR_CURVE,
    EVAL_SUMMARY,
    FAILURES_FILE,
    LESIONS_CSV_SUFFIX,
    LESIONS_SUFFIX,
    MASK_SUFFIX,
    PROB_SUFFIX,
)
from medseg.progress import progress_enabled

log = logging.getLogger(__name__)

VOXEL_COLUMNS = (
    "dice",
    "iou",
    "precision",
    "recall",
    "hd95_mm",
    "assd_mm",
    "ref_volume_ml",
    "pred_volume_ml",
    "abs_volume_diff_ml",
    "rel_volume_diff",
)
LESION_COLUMNS = ("lesion_precision", "lesion_recall", "lesion_f1", "lesion_dice")
LESION_TABLE_COLUMNS = (
    "case_id", "region", "side", "lesion_id", "voxels", "volume_mm3", "size_bucket", "centroid_i",
    "centroid_j", "centroid_k", "matched", "matched_ids", "iou", "dice", "best_iou", "score",
)  # fmt: skip
PR_CURVE_COLUMNS = (
    "class",
    "iou_threshold",
    "rank",
    "score",
    "precision",
    "recall",
    "case_id",
    "lesion_id",
    "tp",
)


class EvaluationError(MedsegError):
    """No case of the manifest could be evaluated (each one's error is in ``failures.csv``)."""


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


@dataclass(frozen=True)
class PredictionFiles:
    """Paths of one case's prediction files (``None`` where an optional file is absent)."""

    mask: Path
    prob: Path | None
    lesions: Path | None
    lesions_csv: Path | None


# the longest name evaluation reads beyond a case id (a longer id cannot name its prediction)
_READ_NAME_EXTRA = max(len(s.encode()) for s in (MASK_SUFFIX, PROB_SUFFIX, LESIONS_SUFFIX, LESIONS_CSV_SUFFIX))


def prediction_files(pred_dir: Path, case_id: str) -> PredictionFiles:
    """Locate a case's files per the contract; ``MedsegError`` when the id is too long to name
    them, ``InputFileError`` when the mask is missing or a folder stands in its place."""
    problem = case_id_problem(case_id, name_extra=_READ_NAME_EXTRA)
    if problem is not None:
        raise MedsegError(problem)
    mask = pred_dir / f"{case_id}{MASK_SUFFIX}"
    if mask.is_dir():
        raise InputFileError(mask, f"a folder is where case {case_id}'s predicted mask should be; remove or rename it")
    if not mask.is_file():
        raise InputFileError(
            mask, f"prediction for case {case_id!r} not found (expected <case_id>{MASK_SUFFIX} in {pred_dir})"
        )

    def optional(suffix: str) -> Path | None:
        p = pred_dir / f"{case_id}{suffix}"
        return p if p.is_file() else None

    lesions, lesions_csv = optional(LESIONS_SUFFIX), optional(LESIONS_CSV_SUFFIX)
    if (lesions is None) != (lesions_csv is None):
        present = lesions or lesions_csv
        log.warning("%s: lesion instance map and CSV come together; this one is ignored", present)
        lesions = lesions_csv = None
    return PredictionFiles(mask, optional(PROB_SUFFIX), lesions, lesions_csv)


# --------------------------------------------------------------------------- reading


def _integer_array(volume: Volume, what: str, hint: str = "") -> np.ndarray:
    """``volume.array`` as an integer array; InputFileError for non-integer values (``hint``
    follows the message, e.g. `` (a probability map?)``)."""
    arr = volume.array
    if arr.dtype.kind in "iub":
        return arr
    if not np.array_equal(arr, np.round(arr)):
        raise InputFileError(volume.path, f"{what} has non-integer values{hint}; an integer label map is expected")
    return arr.astype(np.int32)


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


# --------------------------------------------------------------------------- lesion scores


def _instance_scores(path_csv: Path) -> tuple[dict[int, float], bool]:
    """``{lesion_id: score_mean}`` of a lesion table file (:func:`medseg.outputs.lesion_table_file`)
    and whether the scores are an instance model's learned ones (every row's ``score_source``
    is ``learned``)."""
    try:
        table = pd.read_csv(path_csv)
    except (OSError, ValueError) as exc:
        raise InputFileError(path_csv, f"cannot read lesion table: {exc}") from None
    missing = [c for c in ("lesion_id", "score_mean") if c not in table.columns]
    if missing:
        raise InputFileError(
            path_csv, f"lesion table lacks column(s) {missing} (columns: {list(table.columns)})"
        )
    if table["score_mean"].isna().any():
        raise InputFileError(path_csv, "lesion table has empty score_mean values")
    learned = "score_source" in table.columns and len(table) > 0 and bool((table["score_source"] == "learned").all())
    return {int(i): float(s) for i, s in zip(table["lesion_id"], table["score_mean"], strict=True)}, learned


@dataclass(frozen=True)
class ScoreSource:
    """Where one case's predicted-lesion scores come from (see the module docstring).

    ``kind``: ``learned`` (instances and scores of an instance model), ``lesions_csv``,
    ``probability`` or ``none``. ``prob``: the ``_prob`` array and
    ``instances``: the ``_lesions`` array, ``(I, J, K)`` on the mask's grid (or the same crop of
    it); ``instance_scores``: ``score_mean`` by instance id; ``path``: the file errors name.
    """

    kind: str = "none"
    prob: np.ndarray | None = None
    instances: np.ndarray | None = None
    instance_scores: dict[int, float] | None = None
    path: Path | None = None

    def crop(self, box: tuple[slice, ...]) -> ScoreSource:
        return ScoreSource(
            self.kind,
            None if self.prob is None else self.prob[box],
            None if self.instances is None else self.instances[box],
            self.instance_scores,
            self.path,
        )

    def learned_lesions(self, pred_mask: np.ndarray, box: tuple[slice, ...], where: str) -> tuple[np.ndarray, int, np.ndarray]:
        """An instance model's lesions inside ``pred_mask`` (a region's mask on the sub-box ``box``
        of this source's arrays): (labels 1..n, n, learned score of each)."""
        assert self.instances is not None and self.instance_scores is not None
        inst = np.where(pred_mask, self.instances[box], 0)
        if (pred_mask & (inst == 0)).any():
            raise InputFileError(self.path or "", f"{where}: predicted voxels lie outside every lesion instance")
        labels, old = consecutive_labels(inst)
        return labels, int(old.size), self._table_scores(old, where)

    def _table_scores(self, ids: np.ndarray, where: str) -> np.ndarray:
        """The table's ``score_mean`` of each instance id in ``ids``; an id without a row is an
        ``InputFileError``."""
        assert self.instance_scores is not None
        unknown = sorted({int(i) for i in ids} - set(self.instance_scores))
        if unknown:
            raise InputFileError(
                self.path or "", f"{where}: lesion_id(s) {unknown[:10]} have no row in this table"
            )
        return np.array([self.instance_scores[int(i)] for i in ids], dtype=np.float64)

    def lesion_scores(
        self, pred_labels: np.ndarray, n_pred: int, box: tuple[slice, ...], where: str
    ) -> np.ndarray:
        """``(n_pred,)`` score of each predicted lesion of ``pred_labels`` (a label map of the
        sub-box ``box`` of this source's arrays)."""
        if self.instances is not None and self.instance_scores is not None:
            inst = np.where(pred_labels > 0, self.instances[box], 0).astype(np.int64, copy=False)
            link = overlap_table(pred_labels, inst, n_pred, int(inst.max(initial=0)))
            best = np.zeros(n_pred, dtype=np.int64)
            best_count = np.zeros(n_pred, dtype=np.int64)
            # pairs come sorted by (lesion, instance id): a strict ">" keeps the lower id on ties
            for lesion, instance, count in zip(link.pair_ref, link.pair_pred, link.pair_inter, strict=True):
                if count > best_count[lesion - 1]:
                    best[lesion - 1], best_count[lesion - 1] = instance, count
            if (best == 0).any():
                raise InputFileError(
                    self.path or "", f"{where}: a predicted lesion lies outside every lesion instance"
                )
            return self._table_scores(best, where)
        if self.prob is not None:
            flat = pred_labels.ravel()
            sums = np.bincount(flat, weights=self.prob[box].ravel(), minlength=n_pred + 1)[1:]
            return sums / np.maximum(np.bincount(flat, minlength=n_pred + 1)[1:], 1)
        return np.ones(n_pred, dtype=np.float64)


def read_score_source(files: PredictionFiles, ref: Volume, case_id: str) -> ScoreSource:
    """Read the optional score files of one case, checking they lie on the reference grid."""
    if files.lesions is not None and files.lesions_csv is not None:
        volume = read_volume(files.lesions)
        check_same_grid(ref, volume, f"case {case_id}: lesion instances vs reference")
        instances = _integer_array(volume, "lesion instance map")
        if instances.size and int(instances.min()) < 0:
            raise InputFileError(files.lesions, "lesion instance map has negative values; 0 = background")
        scores, learned = _instance_scores(files.lesions_csv)
        kind = "learned" if learned else "lesions_csv"
        return ScoreSource(kind, instances=instances, instance_scores=scores, path=files.lesions_csv)
    if files.prob is not None:
        volume = read_volume(files.prob)
        check_same_grid(ref, volume, f"case {case_id}: probability vs reference")
        return ScoreSource("probability", prob=volume.array, path=files.prob)
    return ScoreSource()


# --------------------------------------------------------------------------- one case


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


def _thresholds(cfg: Config) -> list[float]:
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
    pred_tp = {t: match_lesions(table, "iou", t).pred_matched for t in _thresholds(cfg)}
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


def evaluate_case(case: Case, pred_dir: Path, cfg: Config, regions: Sequence[Region]) -> list[RegionResult]:
    """Read one case's reference and prediction files; return one result per region."""
    if case.label is None:
        raise ValueError(f"case {case.case_id} has no label to evaluate against")
    if not case.label.exists():  # a manifest read with check_files=False
        raise InputFileError(case.label, f"{case.where}: column label: reference label file not found")
    files = prediction_files(pred_dir, case.case_id)
    ref = read_volume(case.label)
    raw = _integer_array(ref, "reference label")
    pred = read_volume(files.mask)
    check_same_grid(ref, pred, f"case {case.case_id}: prediction vs reference")
    pred_arr = _integer_array(pred, "predicted mask", " (a probability map?)")
    if pred_arr.size and int(pred_arr.min()) < 0:
        raise InputFileError(files.mask, "predicted mask has negative values; 0 = background, 1..K = classes")
    scores = read_score_source(files, ref, case.case_id)

    axis = slice_axis(ref.affine, cfg.evaluation.slice_axis)
    box = case_box(raw, pred_arr, regions, cfg.data.labels)
    cropped = any(b.stop - b.start < n for b, n in zip(box, raw.shape, strict=True))
    ref_masks = reference_masks(raw[box], ref.path, regions, cfg.data.labels, zero_outside=cropped, n_voxels=raw.size)
    pred_masks = prediction_masks(pred_arr[box], regions)
    origin = [b.start for b in box]
    outside = raw.shape[axis] - (box[axis].stop - box[axis].start)
    ref_instances = raw[box] if cfg.data.labels.instances == "values" else None
    return [
        evaluate_region(
            case.case_id,
            region,
            pred_mask,
            ref_mask,
            ref.spacing,
            axis,
            cfg,
            scores.crop(box),
            origin,
            outside,
            ref_instances,
        )
        for region, ref_mask, pred_mask in zip(regions, ref_masks, pred_masks, strict=True)
    ]


# --------------------------------------------------------------------------- dataset


def describe(values: Sequence[float] | pd.Series) -> dict[str, float | int]:
    """Mean, median, std (ddof=1), min, max over the non-NaN values (``pandas.Series.describe``);
    ``n`` used, ``n_nan`` skipped. NaN where too few values."""
    series = pd.Series(values, dtype="float64")
    stats = series.describe()
    return {"mean": float(stats["mean"]), "median": float(stats["50%"]), "std": float(stats["std"]),
            "min": float(stats["min"]), "max": float(stats["max"]), "n": int(stats["count"]),
            "n_nan": int(series.isna().sum())}  # fmt: skip


def _pooled_ranking(results: Sequence[RegionResult], case_ids: Sequence[str]) -> tuple[np.ndarray, ...]:
    """Concatenate one region's predicted lesions over cases: ids, case ids, scores, volumes."""
    ids = np.concatenate([np.arange(1, r.pred_scores.size + 1) for r in results])
    cases = np.concatenate(
        [np.full(r.pred_scores.size, c, dtype=object) for r, c in zip(results, case_ids, strict=True)]
    )
    scores = np.concatenate([r.pred_scores for r in results])
    volumes = np.concatenate([r.pred_volumes for r in results])
    return ids, cases, scores, volumes


def summarise_region(
    name: str, results: Sequence[RegionResult], case_ids: Sequence[str], cfg: Config
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Dataset summary of one region and its PR-curve rows (ranking pooled over cases)."""
    ev = cfg.evaluation
    voxel = {col: describe([getattr(r.voxel, col) for r in results]) for col in VOXEL_COLUMNS}
    voxel["global_dice"] = global_dice(
        [r.voxel.tp_voxels for r in results],
        [r.voxel.fp_voxels for r in results],
        [r.voxel.fn_voxels for r in results],
    )
    voxel["empty_cases"] = {flag: sum(r.voxel.empty == flag for r in results) for flag in EMPTY_FLAGS}

    pooled = LesionCounts(0, 0, 0, 0, 0, 0.0)
    for r in results:
        pooled = pooled + r.counts
    buckets = np.concatenate([r.ref_buckets for r in results])
    detected = np.concatenate([r.ref_detected for r in results])
    by_size = {}
    for bucket in SIZE_BUCKETS:
        sel = buckets == bucket
        by_size[bucket] = {
            "n_ref": int(sel.sum()),
            "detected": int(detected[sel].sum()),
            "recall": float(detected[sel].mean()) if sel.any() else math.nan,
        }
    lesion = {
        "matching": ev.matching,
        "iou_threshold": ev.iou_threshold,
        "connectivity": ev.connectivity,
        "pooled": pooled.as_dict(),
        "per_case": {col: describe([r.row[col] for r in results]) for col in LESION_COLUMNS},
        "recall_by_size": by_size,
        "size_edges_mm3": list(ev.size_edges_mm3),
    }

    ids, cases, scores, volumes = _pooled_ranking(results, case_ids)
    order = rank_order(scores, volumes)
    n_ref = pooled.n_ref
    ap: dict[str, float] = {}
    curve_rows: list[dict[str, Any]] = []
    for t in _thresholds(cfg):
        tp = np.concatenate([r.pred_tp[t] for r in results])[order]
        ap[f"{t:g}"] = average_precision(tp, n_ref)
        precision, recall = precision_recall(tp, n_ref)
        for rank, k in enumerate(order):
            curve_rows.append(
                {
                    "class": name,
                    "iou_threshold": t,
                    "rank": rank + 1,
                    "score": float(scores[k]),
                    "precision": float(precision[rank]),
                    "recall": float(recall[rank]),
                    "case_id": cases[k],
                    "lesion_id": int(ids[k]),
                    "tp": bool(tp[rank]),
                }
            )
    slices = SliceCounts(0, 0, 0, 0)
    for r in results:
        slices = slices + r.slices
    summary = {
        "voxel": voxel,
        "lesion": lesion,
        "detection": {
            "ap": ap,
            "ap_mean_over_thresholds": mean_ap([ap[f"{t:g}"] for t in ev.ap_iou_thresholds]),
            "per_case_ap": {k: describe([r.row[f"ap_iou_{k}"] for r in results]) for k in ap},
        },
        "slices": {
            "axis": ev.slice_axis,
            **slices.as_dict(),
            "per_case_sensitivity": describe([r.slices.sensitivity for r in results]),
            "per_case_specificity": describe([r.slices.specificity for r in results]),
        },
    }
    return summary, curve_rows


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (valid JSON), numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _has_prediction(pred_dir: Path, case_id: str) -> bool:
    """Whether ``pred_dir`` holds something under ``case_id``'s mask name (a file, or a folder
    that then fails the case); an id that cannot name a file counts, so its case fails saying why."""
    try:
        return (pred_dir / f"{case_id}{MASK_SUFFIX}").exists()
    except (OSError, ValueError):
        return True


def select_cases(cases: Sequence[Case], split: str | None, manifest_path: Path) -> list[Case]:
    """Manifest rows that have a label (and belong to ``split`` when given)."""
    chosen = [c for c in cases if c.label is not None and (split is None or c.split == split)]
    if not chosen:
        where = f" in split {split!r}" if split else ""
        raise ManifestError(manifest_path, [f"no case with a label{where}: nothing to evaluate"])
    return chosen


def evaluate(
    pred_dir: str | Path,
    manifest_path: str | Path,
    out_dir: str | Path,
    cfg: Config | None = None,
    progress: bool = True,
    cases: list[Case] | None = None,
    skip_unpredicted: bool = False,
) -> dict[str, Any]:
    """Evaluate ``pred_dir`` against the labels of ``manifest_path``; write the four tables to
    ``out_dir`` (see the module docstring) and return the summary dict (also ``summary.json``).
    ``cases``: evaluate these rows of the manifest instead of all of them (e.g. only those
    that have a prediction); the label and split rules apply to them the same way.
    ``skip_unpredicted``: a labelled case without a predicted mask in ``pred_dir`` is left out
    rather than failed (``medseg evaluate`` without a split: a folder of predictions for some
    of the manifest's cases); the summary lists them (``n_not_predicted``, ``not_predicted``).

    A case that cannot be evaluated (prediction or reference missing or unreadable, a grid
    mismatch, a predicted mask with non-integer values...) is recorded in ``failures.csv``
    (case_id, error; header only when none failed) and the others go on; the summary covers the
    evaluated cases and lists the failures (``n_failed``, ``failures``). Raises
    ``InputFileError`` when ``pred_dir`` is not a folder, ``ManifestError`` when the manifest is
    invalid or no case has a label, ``EvaluationError`` when no case could be evaluated (after
    writing ``failures.csv``).
    """
    cfg = cfg or Config()
    pred_dir, manifest_path, out_dir = Path(pred_dir), Path(manifest_path), Path(out_dir)
    if not pred_dir.is_dir():
        raise InputFileError(pred_dir, "prediction folder not found")
    regions = regions_from_config(cfg)
    # files are checked per case: a missing one fails its case, not the manifest (images are not read)
    rows = read_manifest(manifest_path, check_files=False) if cases is None else cases
    manifest_cases = select_cases(rows, cfg.evaluation.split, manifest_path)
    not_predicted: list[str] = []
    predicted = [c for c in manifest_cases if _has_prediction(pred_dir, c.case_id)] if skip_unpredicted else []
    if predicted:  # (none at all: every case fails below, naming the file it expected)
        not_predicted = [c.case_id for c in manifest_cases if c not in predicted]
        if not_predicted:
            log.info("%d labelled case(s) have no prediction in %s and are not scored: %s", len(not_predicted),
                     pred_dir, ", ".join(not_predicted[:5]) + (", ..." if len(not_predicted) > 5 else ""))
        manifest_cases = predicted

    per_region: dict[str, list[RegionResult]] = {r.name: [] for r in regions}
    sources: list[str] = []
    cases: list[Case] = []
    failures: list[tuple[str, str]] = []
    for case in tqdm(manifest_cases, desc="evaluate", unit="case", disable=not progress_enabled(progress)):
        try:
            results = evaluate_case(case, pred_dir, cfg, regions)
        except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
            error = str(exc) if isinstance(exc, MedsegError) else f"{type(exc).__name__}: {exc}"
            log.warning("case %s failed: %s", case.case_id, error)
            failures.append((case.case_id, error))
            continue
        cases.append(case)
        if results[0].pred_scores.size:  # a case without predicted lesions says nothing about the scores
            sources.append(results[0].row["score_source"])
        for region, result in zip(regions, results, strict=True):
            per_region[region.name].append(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_csv(out_dir / FAILURES_FILE, pd.DataFrame(failures, columns=["case_id", "error"]))
    if not cases:
        first_id, first_error = failures[0]
        raise EvaluationError(
            f"{pred_dir}: none of the {len(failures)} case(s) could be evaluated (see {out_dir / FAILURES_FILE}); "
            f"first: case {first_id}: {first_error}"
        )

    case_ids = [c.case_id for c in cases]
    region_summaries: dict[str, Any] = {}
    curve_rows: list[dict[str, Any]] = []
    for region in regions:
        summary, rows = summarise_region(region.name, per_region[region.name], case_ids, cfg)
        region_summaries[region.name] = summary
        curve_rows.extend(rows)
    if not sources:
        sources = [per_region[regions[0].name][0].row["score_source"]]
    score_source = sources[0] if len(set(sources)) == 1 else "mixed"
    if score_source == "none":
        log.warning(
            "no detection scores in %s: AP ranks lesions by volume only (score_source none)", pred_dir
        )
    elif score_source == "mixed":
        log.warning(
            "cases differ in score source %s: the pooled AP ranking mixes score kinds", sorted(set(sources))
        )
    thresholds = _thresholds(cfg)
    map_by_t = {
        f"{t:g}": mean_ap([s["detection"]["ap"][f"{t:g}"] for s in region_summaries.values()])
        for t in thresholds
    }
    summary = {
        "medseg_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "pred_dir": str(pred_dir),
        "manifest": str(manifest_path),
        "n_cases": len(cases),
        "case_ids": case_ids,
        "n_failed": len(failures),
        "failures": [{"case_id": c, "error": e} for c, e in failures],
        "n_not_predicted": len(not_predicted),
        "not_predicted": not_predicted,
        "regions": [r.name for r in regions],
        "score_source": score_source,
        "score_source_counts": {s: sources.count(s) for s in sorted(set(sources))},
        "map": {
            "by_iou_threshold": map_by_t,
            "at_iou_threshold": map_by_t[f"{cfg.evaluation.iou_threshold:g}"],
            "mean_over_thresholds": mean_ap([map_by_t[f"{t:g}"] for t in cfg.evaluation.ap_iou_thresholds]),
            "iou_thresholds": list(cfg.evaluation.ap_iou_thresholds),
        },
        "per_region": region_summaries,
        "config": cfg.model_dump(mode="json"),
    }
    summary = _json_safe(summary)
    write_tables(out_dir, [per_region[r.name] for r in regions], curve_rows, summary)
    return summary


def write_tables(
    out_dir: Path,
    results: Sequence[Sequence[RegionResult]],
    curve_rows: list[dict[str, Any]],
    summary: dict[str, Any],
) -> None:
    """Write the four output files (each atomically). ``results[region][case]``; rows go out case by case."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_case = list(zip(*results, strict=True))
    rows = [r.row for case in by_case for r in case]
    atomic.write_csv(out_dir / EVAL_PER_CASE, pd.DataFrame(rows))
    lesion_rows = [lr for case in by_case for r in case for lr in r.lesion_rows]
    atomic.write_csv(out_dir / EVAL_LESION_MATCHES, pd.DataFrame(lesion_rows, columns=LESION_TABLE_COLUMNS))
    atomic.write_csv(out_dir / EVAL_PR_CURVE, pd.DataFrame(curve_rows, columns=PR_CURVE_COLUMNS))
    atomic.write_text(out_dir / EVAL_SUMMARY, json.dumps(summary, indent=2, allow_nan=False) + "\n")
