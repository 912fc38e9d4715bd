"""The patient-level bootstrap interval of a mean (``medseg.metrics.uncertainty``) and the
``ci95`` entries it gives the cross-validation summary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medseg.auto.cv_summary import summarise
from medseg.auto.folds import FoldAssignment
from medseg.metrics.uncertainty import CI_METHOD, MIN_PATIENTS, bootstrap_mean_ci


def test_constant_values_give_a_point_interval():
    assert bootstrap_mean_ci([0.8] * 7) == pytest.approx((0.8, 0.8))


def test_interval_matches_the_normal_approximation_for_many_patients():
    values = np.random.default_rng(1).normal(0.85, 0.1, size=200)
    low, high = bootstrap_mean_ci(values)
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(values.size)  # 0.0137 here
    assert low < values.mean() < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)


def test_cases_of_one_patient_count_once():
    """Two identical scans per patient are one patient's evidence: the interval is that of the
    patients alone, and wider than if the scans were taken as independent patients."""
    per_patient = [0.6, 0.7, 0.8, 0.9, 0.95]
    values = np.repeat(per_patient, 2)
    patients = np.repeat([f"p{i}" for i in range(5)], 2)
    by_patient = bootstrap_mean_ci(values, patients)
    assert by_patient == pytest.approx(bootstrap_mean_ci(per_patient))
    as_cases = bootstrap_mean_ci(values)
    assert as_cases[1] - as_cases[0] < 0.85 * (by_patient[1] - by_patient[0])


def test_nan_values_are_left_out_and_few_patients_give_none():
    with_nan = bootstrap_mean_ci([0.5, np.nan, 0.7, 0.9, np.nan], seed=3)
    assert with_nan == pytest.approx(bootstrap_mean_ci([0.5, 0.7, 0.9], seed=3))
    assert bootstrap_mean_ci([0.5, 0.7]) is None and MIN_PATIENTS == 3
    assert bootstrap_mean_ci([0.5, 0.7, 0.9, 0.6], ["a", "a", "b", "b"]) is None


def test_deterministic_for_a_seed_and_validates_its_inputs():
    values = [0.64, 0.66, 0.8, 0.83, 0.86, 0.87, 0.87, 0.88, 0.89, 0.91, 0.94, 0.95]
    assert bootstrap_mean_ci(values, seed=5) == bootstrap_mean_ci(values, seed=5)
    narrow = bootstrap_mean_ci(values, level=0.5)
    wide = bootstrap_mean_ci(values, level=0.95)
    assert wide[0] < narrow[0] < np.mean(values) < narrow[1] < wide[1]
    with pytest.raises(ValueError, match="3 values but 2 patient ids"):
        bootstrap_mean_ci([0.1, 0.2, 0.3], ["a", "b"])
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean_ci(values, level=1.0)


def test_cv_summary_carries_a_patient_level_interval_per_metric():
    """Patient p0 has two scans; the summary's interval resamples patients, not scans."""
    table = pd.DataFrame({
        "case_id": ["a0", "a1", "b", "c", "d", "mean"], "patient_id": ["p0", "p0", "p1", "p2", "p3", ""],
        "fold": [0, 0, 0, 1, 1, -1], "region": "lesion",
        "dice": [0.5, 0.6, 0.8, 0.9, 0.7, 0.7], "hd95_mm": [20.0, 18.0, 4.0, 3.0, np.nan, 11.25],
    })  # fmt: skip
    folds = FoldAssignment(n_folds=2, seed=0, patients=(("p0", "p1"), ("p2", "p3")), case_ids=("a0", "a1", "b", "c", "d"))
    summary = summarise(table, folds, [[{}], [{}]], "cpu")
    assert summary["ci95"] == CI_METHOD
    cases = table.iloc[:-1]
    dice_ci = summary["metrics"]["dice"]["ci95"]
    assert dice_ci == pytest.approx(list(bootstrap_mean_ci(cases["dice"], cases["patient_id"])))
    assert dice_ci != pytest.approx(list(bootstrap_mean_ci(cases["dice"])))
    assert dice_ci[0] < summary["metrics"]["dice"]["mean"] < dice_ci[1]
    hd95_ci = summary["metrics"]["hd95_mm"]["ci95"]  # p3 has no HD95: 3 patients left
    assert hd95_ci == pytest.approx(list(bootstrap_mean_ci(cases["hd95_mm"], cases["patient_id"])))
