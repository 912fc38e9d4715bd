"""Lesion-wise metrics: 3-D connected components, matching, lesion P/R/F1 and lesion-wise Dice.

A lesion is a connected component of a binary mask (6-, 18- or 26-connectivity; 26 by default).
Label maps are integer arrays of one shape in any fixed axis order (e.g. ``(I, J, K)``), 0 =
background and lesions numbered ``1..n``.

Everything is derived from one :class:`OverlapTable`, built in one pass over the voxels where
both label maps are non-zero (``np.unique`` of combined pair codes) -- never from per-pair masks.

Matching modes (:func:`match_lesions`):

- ``"iou"`` (LiTS-style): one-to-one; pairs are taken greedily by decreasing IoU (ties: lower
  reference id, then lower prediction id) while both lesions are free and ``IoU > threshold``.
  For ``threshold >= 0.5`` the matching is unique whatever the order.
- ``"overlap"`` (BraTS-style): many-to-many; every overlapping pair matches. A reference lesion
  is detected when any predicted lesion touches it, and its Dice is computed against the union
  of all predicted lesions that touch it (BraTS 2023 does the same after dilating the reference
  lesion by 3 voxels; no dilation is applied here).

Counts: TP = detected reference lesions, FN = missed reference lesions, FP = predicted lesions
matched to no reference lesion (in ``"iou"`` mode TP also equals the matched predicted lesions).
precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2TP / (2TP + FP + FN).
Lesion-wise Dice (BraTS 2023): sum of the Dice of every reference lesion with its match (0 for
a missed one) divided by ``n_reference + FP`` (each FP lesion counts as a 0).

Empty policy: no reference and no predicted lesion -> precision, recall, F1 and lesion-wise
Dice are 1 (flag ``both``); no reference lesion only -> precision 0, recall NaN, F1 0,
lesion-wise Dice 0; no predicted lesion only -> precision NaN, recall 0, F1 0, lesion-wise Dice 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

MatchMode = Literal["iou", "overlap"]
Side = Literal["ref", "pred"]
SIZE_BUCKETS = ("small", "medium", "large")


@dataclass(frozen=True)
class OverlapTable:
    """Sizes of every lesion and intersections of every overlapping (reference, predicted) pair.

    ``ref_sizes`` ``(n_ref,)`` and ``pred_sizes`` ``(n_pred,)``: voxels of lesion ``id`` at index
    ``id - 1``. ``pair_ref``, ``pair_pred`` ``(n_pairs,)``: 1-based lesion ids of each pair with
    at least one shared voxel; ``pair_inter`` ``(n_pairs,)``: the shared voxels.
    """

    ref_sizes: np.ndarray
    pred_sizes: np.ndarray
    pair_ref: np.ndarray
    pair_pred: np.ndarray
    pair_inter: np.ndarray

    @property
    def n_ref(self) -> int:
        return int(self.ref_sizes.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_sizes.size)

    @property
    def pair_iou(self) -> np.ndarray:
        """IoU of each pair, ``(n_pairs,)`` float64."""
        union = self.ref_sizes[self.pair_ref - 1] + self.pred_sizes[self.pair_pred - 1] - self.pair_inter
        return self.pair_inter / union


def overlap_table(ref_labels: np.ndarray, pred_labels: np.ndarray, n_ref: int, n_pred: int) -> OverlapTable:
    """One pass over two label maps of one shape (lesions ``1..n_ref`` and ``1..n_pred``)."""
    if ref_labels.shape != pred_labels.shape:
        raise ValueError(f"label maps differ in shape: {ref_labels.shape} vs {pred_labels.shape}")
    ref_sizes = np.bincount(ref_labels.ravel(), minlength=n_ref + 1)[1:].astype(np.int64)
    pred_sizes = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)[1:].astype(np.int64)
    if ref_sizes.size != n_ref or pred_sizes.size != n_pred:
        raise ValueError("label maps hold ids above the stated lesion counts")
    both = (ref_labels > 0) & (pred_labels > 0)
    codes = ref_labels[both].astype(np.int64) * (n_pred + 1) + pred_labels[both]
    pair_codes, pair_inter = np.unique(codes, return_counts=True)
    return OverlapTable(
        ref_sizes=ref_sizes,
        pred_sizes=pred_sizes,
        pair_ref=pair_codes // (n_pred + 1),
        pair_pred=pair_codes % (n_pred + 1),
        pair_inter=pair_inter.astype(np.int64),
    )


@dataclass(frozen=True)
class LesionMatching:
    """Result of :func:`match_lesions`: ``matched`` ``(n_pairs,)`` bool over the table's pairs."""

    table: OverlapTable
    matched: np.ndarray
    mode: MatchMode
    threshold: float

    @property
    def ref_detected(self) -> np.ndarray:
        """``(n_ref,)`` bool: reference lesion ``id`` (index ``id - 1``) has a match."""
        out = np.zeros(self.table.n_ref, dtype=bool)
        out[self.table.pair_ref[self.matched] - 1] = True
        return out

    @property
    def pred_matched(self) -> np.ndarray:
        """``(n_pred,)`` bool: predicted lesion ``id`` (index ``id - 1``) has a match (is a TP)."""
        out = np.zeros(self.table.n_pred, dtype=bool)
        out[self.table.pair_pred[self.matched] - 1] = True
        return out

    def partners(self, side: Side) -> list[list[int]]:
        """Matched partner ids of every lesion of ``side`` (1-based ids, ascending)."""
        t = self.table
        own, other, n = (
            (t.pair_ref, t.pair_pred, t.n_ref) if side == "ref" else (t.pair_pred, t.pair_ref, t.n_pred)
        )
        out: list[list[int]] = [[] for _ in range(n)]
        for a, b in zip(own[self.matched], other[self.matched], strict=True):
            out[int(a) - 1].append(int(b))
        return [sorted(p) for p in out]

    def _matched_overlap(self, side: Side) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per lesion of ``side``: own size, shared voxels with its partners, partners' sizes."""
        t = self.table
        if side == "ref":
            own_ids, other_ids, own_sizes, other_sizes = t.pair_ref, t.pair_pred, t.ref_sizes, t.pred_sizes
        else:
            own_ids, other_ids, own_sizes, other_sizes = t.pair_pred, t.pair_ref, t.pred_sizes, t.ref_sizes
        m = self.matched
        n = own_sizes.size
        inter = np.bincount(own_ids[m] - 1, weights=t.pair_inter[m], minlength=n)
        partner = np.bincount(own_ids[m] - 1, weights=other_sizes[other_ids[m] - 1], minlength=n)
        return own_sizes.astype(np.float64), inter, partner

    def dice(self, side: Side = "ref") -> np.ndarray:
        """Dice of each lesion of ``side`` with the union of its partners (0 when unmatched)."""
        own, inter, partner = self._matched_overlap(side)
        return 2.0 * inter / (own + partner)

    def iou(self, side: Side = "ref") -> np.ndarray:
        """IoU of each lesion of ``side`` with the union of its partners (0 when unmatched)."""
        own, inter, partner = self._matched_overlap(side)
        return inter / (own + partner - inter)


def best_iou(table: OverlapTable, side: Side) -> np.ndarray:
    """Largest pair IoU of each lesion of ``side`` with any single lesion of the other (0: none)."""
    ids, n = (table.pair_ref, table.n_ref) if side == "ref" else (table.pair_pred, table.n_pred)
    out = np.zeros(n, dtype=np.float64)
    np.maximum.at(out, ids - 1, table.pair_iou)
    return out


def match_lesions(table: OverlapTable, mode: MatchMode = "iou", threshold: float = 0.5) -> LesionMatching:
    """Match reference and predicted lesions (see the module docstring for both modes).

    ``threshold`` is the strict IoU bound of ``"iou"`` mode (ignored by ``"overlap"``).
    """
    n_pairs = table.pair_inter.size
    if mode == "overlap":
        return LesionMatching(table, np.ones(n_pairs, dtype=bool), mode, threshold)
    if mode != "iou":
        raise ValueError(f"unknown matching mode {mode!r}; use 'iou' or 'overlap'")
    iou = table.pair_iou
    matched = np.zeros(n_pairs, dtype=bool)
    ref_taken = np.zeros(table.n_ref + 1, dtype=bool)
    pred_taken = np.zeros(table.n_pred + 1, dtype=bool)
    order = np.lexsort((table.pair_pred, table.pair_ref, -iou))
    for k in order:
        if iou[k] <= threshold:
            break
        r, p = table.pair_ref[k], table.pair_pred[k]
        if not ref_taken[r] and not pred_taken[p]:
            matched[k] = ref_taken[r] = pred_taken[p] = True
    return LesionMatching(table, matched, mode, threshold)


def size_buckets(volumes_mm3: np.ndarray, edges_mm3: Sequence[float]) -> np.ndarray:
    """Bucket name of each lesion volume: small ``< edges[0] <=`` medium ``< edges[1] <=`` large."""
    if len(edges_mm3) != 2 or not edges_mm3[0] < edges_mm3[1]:
        raise ValueError(f"size edges must be two increasing volumes in mm³, got {list(edges_mm3)}")
    index = np.searchsorted(np.asarray(edges_mm3, dtype=np.float64), volumes_mm3, side="right")
    return np.asarray(SIZE_BUCKETS, dtype=object)[index]


@dataclass(frozen=True)
class LesionCounts:
    """Lesion-detection counts and scores of one case (or pooled over cases)."""

    n_ref: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    dice_sum: float

    @property
    def precision(self) -> float:
        if self.n_ref == 0 and self.n_pred == 0:
            return 1.0
        return self.tp / (self.tp + self.fp) if self.tp + self.fp > 0 else float("nan")

    @property
    def recall(self) -> float:
        if self.n_ref == 0:
            return 1.0 if self.n_pred == 0 else float("nan")
        return self.tp / self.n_ref

    @property
    def f1(self) -> float:
        den = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / den if den > 0 else 1.0

    @property
    def lesion_dice(self) -> float:
        """BraTS 2023 lesion-wise Dice: ``Σ Dice(matched ref lesions) / (n_ref + FP)``."""
        den = self.n_ref + self.fp
        return self.dice_sum / den if den > 0 else 1.0

    def __add__(self, other: LesionCounts) -> LesionCounts:
        return LesionCounts(
            self.n_ref + other.n_ref,
            self.n_pred + other.n_pred,
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.dice_sum + other.dice_sum,
        )

    def as_dict(self) -> dict[str, float | int]:
        return {
            "n_ref": self.n_ref,
            "n_pred": self.n_pred,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "lesion_dice": self.lesion_dice,
        }


def lesion_counts(matching: LesionMatching) -> LesionCounts:
    """TP/FP/FN and the lesion-wise Dice numerator of one matched case."""
    detected = matching.ref_detected
    tp = int(detected.sum())
    return LesionCounts(
        n_ref=matching.table.n_ref,
        n_pred=matching.table.n_pred,
        tp=tp,
        fp=int((~matching.pred_matched).sum()),
        fn=matching.table.n_ref - tp,
        dice_sum=float(matching.dice("ref").sum()),
    )
