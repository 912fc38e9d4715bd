"""Dataset summary of per-case results (:mod:`medseg.metrics.case_scores`): results in, the
``summary.json`` sections and ``pr_curve.csv`` rows out (no file access).

Per region: mean / median / std of each metric (NaN skipped and counted), global Dice,
empty-mask counts, pooled lesion metrics, recall by size, AP per IoU threshold and slice-level
detection. Lesion tables, AP rankings and slice counts are pooled over all evaluated cases;
per-case means are reported alongside. Over regions: mAP per threshold and over thresholds, and
the score source of the cases with predicted lesions (``mixed`` when they differ).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from medseg.config import Config
from medseg.metrics.case_scores import RegionResult, ap_thresholds
from medseg.metrics.detection import SliceCounts, average_precision, mean_ap, precision_recall, rank_order
from medseg.metrics.lesion import SIZE_BUCKETS, LesionCounts
from medseg.metrics.voxel import EMPTY_FLAGS, global_dice

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
    for t in ap_thresholds(cfg):
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



def summarise_dataset(
    per_region: Mapping[str, Sequence[RegionResult]], case_ids: Sequence[str], cfg: Config
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The dataset-wide part of ``summary.json`` (``score_source``, ``score_source_counts``,
    ``map``, ``per_region``) and every region's PR-curve rows. ``per_region[name][i]``: region
    ``name``'s result of case ``case_ids[i]`` (at least one case; regions in output order)."""
    region_summaries: dict[str, Any] = {}
    curve_rows: list[dict[str, Any]] = []
    for name, results in per_region.items():
        summary, rows = summarise_region(name, results, case_ids, cfg)
        region_summaries[name] = summary
        curve_rows.extend(rows)
    first = next(iter(per_region.values()))
    # a case without predicted lesions says nothing about the scores
    sources = [r.row["score_source"] for r in first if r.pred_scores.size] or [first[0].row["score_source"]]
    map_by_t = {
        f"{t:g}": mean_ap([s["detection"]["ap"][f"{t:g}"] for s in region_summaries.values()])
        for t in ap_thresholds(cfg)
    }
    dataset = {
        "score_source": sources[0] if len(set(sources)) == 1 else "mixed",
        "score_source_counts": {s: sources.count(s) for s in sorted(set(sources))},
        "map": {
            "by_iou_threshold": map_by_t,
            "at_iou_threshold": map_by_t[f"{cfg.evaluation.iou_threshold:g}"],
            "mean_over_thresholds": mean_ap([map_by_t[f"{t:g}"] for t in cfg.evaluation.ap_iou_thresholds]),
            "iou_thresholds": list(cfg.evaluation.ap_iou_thresholds),
        },
        "per_region": region_summaries,
    }
    return dataset, curve_rows


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (valid JSON), numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
