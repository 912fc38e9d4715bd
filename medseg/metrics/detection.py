"""Detection metrics: average precision over ranked lesions, PR curves, per-slice detection.

AP (as the course notes define it): rank the predicted lesions of one class by score (highest
first); at every rank ``k`` that holds a true positive take the precision ``TP(k) / k``;
``AP = Σ precision@TP-ranks / n_reference`` -- so every reference lesion that is never found
contributes 0. mAP is the mean of AP over classes (and, separately, over IoU thresholds).
Whether a predicted lesion is a true positive comes from the lesion matching
(:mod:`medseg.metrics.lesion`), one-to-one, so a reference lesion is counted at most once.

Ranking ties (equal scores) are broken by lesion volume, larger first, then by input order;
with no scores at all every score is 1 and the ranking is by volume alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def rank_order(scores: Sequence[float] | np.ndarray, volumes: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices that sort predictions by score (descending), then volume (descending), then
    input position (ascending). ``scores``, ``volumes``: ``(n,)``; returns ``(n,)`` int."""
    scores = np.asarray(scores, dtype=np.float64)
    volumes = np.asarray(volumes, dtype=np.float64)
    if scores.shape != volumes.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and volumes {volumes.shape} must be 1-D of one length")
    if np.isnan(scores).any():
        raise ValueError("lesion scores must not be NaN")
    return np.lexsort((np.arange(scores.size), -volumes, -scores))


def precision_recall(is_tp_ranked: Sequence[bool] | np.ndarray, n_ref: int) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after each rank: ``(n,)`` each, for predictions already in rank order.

    Recall is NaN throughout when there is no reference lesion."""
    hits = np.asarray(is_tp_ranked, dtype=bool)
    if int(hits.sum()) > n_ref:
        raise ValueError(f"{int(hits.sum())} true positives but only {n_ref} reference lesions")
    tp = np.cumsum(hits)
    ranks = np.arange(1, hits.size + 1)
    recall = tp / n_ref if n_ref > 0 else np.full(hits.size, np.nan)
    return tp / ranks, recall


def average_precision(is_tp_ranked: Sequence[bool] | np.ndarray, n_ref: int) -> float:
    """AP of predictions in rank order (``True`` = true positive) against ``n_ref`` reference
    lesions: mean over reference lesions of the precision at the rank where each is found
    (0 for those never found). NaN when ``n_ref == 0`` (nothing to find)."""
    if n_ref == 0:
        return float("nan")
    precision, _ = precision_recall(is_tp_ranked, n_ref)
    hits = np.asarray(is_tp_ranked, dtype=bool)
    return float(precision[hits].sum() / n_ref)


def mean_ap(values: Sequence[float]) -> float:
    """Mean of AP values, skipping NaN (classes or thresholds without reference lesions)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


@dataclass(frozen=True)
class SliceCounts:
    """Slice-level detection counts: a slice is positive when it holds any lesion voxel."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def sensitivity(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn > 0 else float("nan")

    @property
    def specificity(self) -> float:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp > 0 else float("nan")

    def __add__(self, other: SliceCounts) -> SliceCounts:
        return SliceCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "tn": self.tn,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
        }


def slice_detection(pred: np.ndarray, ref: np.ndarray, axis: int) -> SliceCounts:
    """Compare which slices along ``axis`` hold lesion in two boolean masks of one shape."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    others = tuple(a for a in range(ref.ndim) if a != axis)
    p = np.asarray(pred, dtype=bool).any(axis=others)
    r = np.asarray(ref, dtype=bool).any(axis=others)
    return SliceCounts(
        tp=int(np.sum(p & r)), fp=int(np.sum(p & ~r)), fn=int(np.sum(~p & r)), tn=int(np.sum(~p & ~r))
    )
