"""The QC score (the model's doubt about a case) and its calibration on out-of-fold Dice."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.metrics.qc import MIN_CASES, calibrate, uncertain_fraction


def test_crisp_lesions_score_zero_and_doubt_scores_higher():
    crisp = np.zeros((8, 8, 4))
    crisp[2:5, 2:5, 1:3] = 1.0
    assert uncertain_fraction(crisp) == 0.0
    assert uncertain_fraction(np.zeros((4, 4, 4))) == 0.0  # nothing predicted, nothing doubted
    border = crisp.copy()
    border[1, 2:5, 1:3] = 0.5  # an uncertain rim around the same lesion
    faint = np.full((8, 8, 4), 0.05)  # faint doubt everywhere, nothing called lesion
    assert 0.0 < uncertain_fraction(border) < uncertain_fraction(faint)
    assert uncertain_fraction(np.full(10, 0.5)) == pytest.approx(2.0)  # 10 bits over 5 voxels of soft lesion


def test_a_score_that_tracks_the_dice_is_useful_and_catches_the_worst():
    rng = np.random.default_rng(0)
    dice = rng.uniform(0.4, 0.95, 40)
    scores = (1.0 - dice) + rng.normal(0.0, 0.03, 40)
    record = calibrate(scores, dice, [f"p{i // 2}" for i in range(40)])  # two scans per patient
    assert record["useful"] and record["spearman"] < -0.8 and record["ci95"][1] < 0
    assert record["n_patients"] == 20 and record["worst_caught"] >= 0.5
    assert np.mean(scores >= record["threshold"]) == pytest.approx(0.1)


def test_an_unrelated_score_flags_nothing_and_says_why():
    rng = np.random.default_rng(1)
    record = calibrate(rng.uniform(size=30), rng.uniform(size=30), [str(i) for i in range(30)])
    assert not record["useful"] and record["ci95"][0] < 0 < record["ci95"][1]
    assert "does not rank the accuracy" in record["why"]


def test_too_few_cases_give_no_calibration():
    record = calibrate([0.1] * (MIN_CASES - 1), [0.8] * (MIN_CASES - 1), ["a"] * (MIN_CASES - 1))
    assert not record["useful"] and record["spearman"] is None and "at least" in record["why"]
    nan = calibrate([0.1, np.nan, 0.3, 0.2, 0.5, 0.4], [0.8, 0.7, np.nan, 0.6, 0.5, 0.9], list("abcdef"))
    assert nan["n_cases"] == 4 and not nan["useful"]
