"""Lesion matching on a hand-built scene: a split lesion, a merged pair, a missed lesion and an FP."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.geometry import label_components as label_lesions
from medseg.metrics.lesion import (
    LesionCounts,
    best_iou,
    lesion_counts,
    match_lesions,
    overlap_table,
    size_buckets,
)


def slabs(ranges: list[tuple[int, int]]) -> np.ndarray:
    """Mask of shape (40, 10, 10) with 4x4 blocks spanning x = a..b (inclusive) for each range."""
    mask = np.zeros((40, 10, 10), dtype=bool)
    for a, b in ranges:
        mask[a : b + 1, 3:7, 3:7] = True
    return mask


# Reference R1 x2..9 (128 voxels), R2 x14..16 (48), R3 x18..20 (48), R4 x25..27 (48, missed).
# Prediction P1 x2..6 (80) + P2 x8..9 (32) split R1; P3 x14..20 (112) merges R2 and R3; P4 x32..34 (48) is an FP.
# Pairs: R1-P1 inter 80, IoU 80/128 = 0.625; R1-P2 inter 32, IoU 0.25; R2-P3 and R3-P3 inter 48, IoU 48/112.
REF = slabs([(2, 9), (14, 16), (18, 20), (25, 27)])
PRED = slabs([(2, 6), (8, 9), (14, 20), (32, 34)])


@pytest.fixture(scope="module")
def table():
    ref_labels, n_ref = label_lesions(REF)
    pred_labels, n_pred = label_lesions(PRED)
    return overlap_table(ref_labels, pred_labels, n_ref, n_pred)


def test_overlap_table(table) -> None:
    assert table.ref_sizes.tolist() == [128, 48, 48, 48]
    assert table.pred_sizes.tolist() == [80, 32, 112, 48]
    pairs = {
        (int(r), int(p)): int(i)
        for r, p, i in zip(table.pair_ref, table.pair_pred, table.pair_inter, strict=True)
    }
    assert pairs == {(1, 1): 80, (1, 2): 32, (2, 3): 48, (3, 3): 48}
    assert np.allclose(table.pair_iou, [0.625, 0.25, 48 / 112, 48 / 112])
    assert best_iou(table, "ref").tolist() == pytest.approx([0.625, 48 / 112, 48 / 112, 0.0])


def test_iou_matching_at_one_half(table) -> None:
    """Only R1-P1 exceeds IoU 0.5: TP 1, FN 3 (R2, R3, R4), FP 3 (P2, P3, P4)."""
    m = match_lesions(table, "iou", 0.5)
    assert m.ref_detected.tolist() == [True, False, False, False]
    assert m.pred_matched.tolist() == [True, False, False, False]
    c = lesion_counts(m)
    assert (c.tp, c.fp, c.fn) == (1, 3, 3)
    assert c.precision == pytest.approx(0.25) and c.recall == pytest.approx(0.25)
    assert c.f1 == pytest.approx(2 / (2 + 3 + 3))
    # lesion-wise Dice: Dice(R1, P1) = 160/208; FN and FP lesions count 0; 4 reference + 3 FP items
    assert c.lesion_dice == pytest.approx((160 / 208) / 7)


def test_iou_matching_is_one_to_one_and_greedy(table) -> None:
    """At IoU > 0.2 P3 could match R2 or R3 (equal IoU): the tie goes to the lower id, R2;
    R1-P2 (0.25) loses because R1 is already taken by the better P1."""
    m = match_lesions(table, "iou", 0.2)
    assert m.partners("ref") == [[1], [3], [], []]
    assert m.partners("pred") == [[1], [], [2], []]
    c = lesion_counts(m)
    assert (c.tp, c.fp, c.fn) == (2, 2, 2)


def test_any_overlap_matching(table) -> None:
    """BraTS-style: R1 (split), R2 and R3 (merged) are detected, R4 missed, P4 is the only FP.
    Lesion Dice: R1 vs P1+P2 = 2*112/240, R2 and R3 vs P3 = 96/160 each, R4 0; over 4 + 1 items."""
    m = match_lesions(table, "overlap")
    assert m.partners("ref") == [[1, 2], [3], [3], []]
    assert m.partners("pred") == [[1], [1], [2, 3], []]
    c = lesion_counts(m)
    assert (c.tp, c.fp, c.fn) == (3, 1, 1)
    assert (c.precision, c.recall, c.f1) == pytest.approx((0.75, 0.75, 0.75))
    assert m.dice("ref").tolist() == pytest.approx([224 / 240, 0.6, 0.6, 0.0])
    assert c.lesion_dice == pytest.approx((224 / 240 + 0.6 + 0.6) / 5)
    assert m.iou("pred")[2] == pytest.approx(96 / 112)  # P3 vs R2 + R3


@pytest.mark.parametrize(("connectivity", "n_corner", "n_edge"), [(6, 2, 2), (18, 2, 1), (26, 1, 1)])
def test_connectivity(connectivity: int, n_corner: int, n_edge: int) -> None:
    corner = np.zeros((3, 3, 3), dtype=bool)
    corner[0, 0, 0] = corner[1, 1, 1] = True
    edge = np.zeros((3, 3, 3), dtype=bool)
    edge[0, 0, 0] = edge[1, 1, 0] = True
    assert label_lesions(corner, connectivity)[1] == n_corner
    assert label_lesions(edge, connectivity)[1] == n_edge


def test_overlap_table_equals_per_pair_masks() -> None:
    rng = np.random.default_rng(3)
    ref_labels, n_ref = label_lesions(rng.random((20, 20, 20)) > 0.7, 6)
    pred_labels, n_pred = label_lesions(rng.random((20, 20, 20)) > 0.7, 6)
    t = overlap_table(ref_labels, pred_labels, n_ref, n_pred)
    for r, p, inter in zip(t.pair_ref, t.pair_pred, t.pair_inter, strict=True):
        assert inter == np.count_nonzero((ref_labels == r) & (pred_labels == p))
    assert t.pair_inter.sum() == np.count_nonzero((ref_labels > 0) & (pred_labels > 0))


def test_size_buckets() -> None:
    buckets = size_buckets(np.array([100.0, 500.0, 4999.0, 5000.0]), (500.0, 5000.0))
    assert buckets.tolist() == ["small", "medium", "medium", "large"]
    with pytest.raises(ValueError, match="increasing"):
        size_buckets(np.array([1.0]), (10.0, 5.0))


def test_empty_lesion_policy() -> None:
    both = LesionCounts(0, 0, 0, 0, 0, 0.0)
    assert (both.precision, both.recall, both.f1, both.lesion_dice) == (1, 1, 1, 1)
    no_ref = LesionCounts(0, 2, 0, 2, 0, 0.0)
    assert (no_ref.precision, no_ref.f1, no_ref.lesion_dice) == (0, 0, 0) and math.isnan(no_ref.recall)
    no_pred = LesionCounts(3, 0, 0, 0, 3, 0.0)
    assert (no_pred.recall, no_pred.f1, no_pred.lesion_dice) == (0, 0, 0) and math.isnan(no_pred.precision)
