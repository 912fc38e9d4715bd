"""AP/mAP on the course-notes example, ranking ties, PR curves, per-slice detection and its axis."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.geometry import slice_axis
from medseg.metrics.detection import (
    SliceCounts,
    average_precision,
    mean_ap,
    precision_recall,
    rank_order,
    slice_detection,
)


def test_two_rankings_example() -> None:
    """Ranking 1: hits at ranks 1 and 3 of 2 objects -> (1/1 + 2/3) / 2 = 5/6.
    Ranking 2: hits at ranks 1 and 2 -> (1 + 1) / 2 = 1. mAP = (5/6 + 1) / 2 = 11/12."""
    ap1 = average_precision([True, False, True, False], n_ref=2)
    ap2 = average_precision([True, True, False], n_ref=2)
    assert ap1 == pytest.approx(5 / 6)
    assert ap2 == pytest.approx(1.0)
    assert mean_ap([ap1, ap2]) == pytest.approx(11 / 12)


def test_missed_reference_lesion_counts_zero() -> None:
    # 3 reference lesions, only one found, at rank 2: AP = (1/2) / 3
    assert average_precision([False, True], n_ref=3) == pytest.approx(1 / 6)
    assert average_precision([], n_ref=2) == 0.0
    assert math.isnan(average_precision([False], n_ref=0))
    assert mean_ap([float("nan"), 0.5]) == 0.5


def test_precision_recall_curve() -> None:
    precision, recall = precision_recall([True, False, True, False], n_ref=2)
    assert precision.tolist() == pytest.approx([1.0, 0.5, 2 / 3, 0.5])
    assert recall.tolist() == pytest.approx([0.5, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="true positives"):
        precision_recall([True, True], n_ref=1)


def test_rank_order_breaks_ties_by_volume() -> None:
    scores = [0.5, 0.9, 0.5, 1.0]
    volumes = [10.0, 1.0, 30.0, 5.0]
    assert rank_order(scores, volumes).tolist() == [3, 1, 2, 0]
    # no scores: all 1 -> larger lesions first, then input order
    assert rank_order([1.0, 1.0, 1.0], [2.0, 7.0, 2.0]).tolist() == [1, 0, 2]


def test_slice_detection_counts() -> None:
    ref = np.zeros((4, 4, 6), dtype=bool)
    pred = np.zeros_like(ref)
    ref[1, 1, [1, 2, 3]] = True  # slices 1..3 positive along axis 2
    pred[2, 2, [2, 3, 4]] = True  # slices 2..4 predicted
    counts = slice_detection(pred, ref, axis=2)
    assert counts == SliceCounts(tp=2, fp=1, fn=1, tn=2)
    assert counts.sensitivity == pytest.approx(2 / 3) and counts.specificity == pytest.approx(2 / 3)
    total = counts + SliceCounts(1, 0, 0, 5)
    assert (total.sensitivity, total.specificity) == pytest.approx((3 / 4, 7 / 8))


def test_slice_axis_follows_the_affine() -> None:
    """Array axis 0 runs inferior->superior (with a flip and a small rotation): axial axis is 0."""
    affine = np.array(
        [[0.0, 0.9, 0.1, 10.0], [0.0, -0.1, 2.0, -5.0], [-3.0, 0.0, 0.0, 7.0], [0.0, 0.0, 0.0, 1.0]]
    )
    assert slice_axis(affine, "axial") == 0
    assert slice_axis(affine, "sagittal") == 1
    assert slice_axis(affine, "coronal") == 2
    assert slice_axis(np.diag([-1.0, -1.0, 1.0, 1.0]), "axial") == 2
