"""The cross-validation's table and summary computed from rows (``medseg.auto.cv_summary``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medseg.auto.cv_summary import cv_table, first_region_rows, summarise
from medseg.auto.folds import FoldAssignment
from medseg.manifest import Case

FOLDS = FoldAssignment(n_folds=2, seed=0, patients=(("p0", "p2"), ("p1",)), case_ids=("a", "b", "c", "d"))
CASES = [Case(c, p, "MR", {}, None, "train") for c, p in (("a", "p0"), ("b", "p1"), ("c", "p2"), ("d", "p2"))]


def _metrics() -> pd.DataFrame:
    """``metrics_per_case.csv`` rows: two regions, an extra column the table drops, one NaN HD95."""
    return pd.DataFrame({
        "case_id": ["d", "c", "b", "a", "d", "c", "b", "a"], "region": ["lesion"] * 4 + ["edema"] * 4,
        "dice": [0.4, 0.6, 0.8, 1.0, 0.1, 0.1, 0.1, 0.1], "extra": 7.0,
        "hd95_mm": [np.nan, 4.0, 2.0, 1.0, 9.0, 9.0, 9.0, 9.0],
    })  # fmt: skip


def test_table_keeps_the_first_region_sorted_by_fold_then_case_with_a_mean_row():
    region, rows = first_region_rows(_metrics())
    assert region == "lesion" and len(rows) == 4
    table = cv_table(rows, FOLDS, CASES)
    assert list(table.columns) == ["case_id", "patient_id", "fold", "region", "dice", "hd95_mm"]
    assert table["case_id"].tolist() == ["a", "c", "d", "b", "mean"]
    assert table["fold"].tolist() == [0, 0, 0, 1, -1] and table["patient_id"].tolist()[:4] == ["p0", "p2", "p2", "p1"]
    mean = table.iloc[-1]
    assert mean["dice"] == pytest.approx(0.7) and mean["hd95_mm"] == pytest.approx(7 / 3)  # NaN skipped


def test_summary_adds_up_repeats_and_says_none_for_an_unknown_fold_time():
    table = cv_table(first_region_rows(_metrics())[1], FOLDS, CASES)
    records = [[{"seconds": 10.0, "epochs": 3}, {"seconds": 12.5, "epochs": 4}], [{"seconds": 5.0, "epochs": 2}, {}]]
    summary = summarise(table, FOLDS, records, "cpu")
    assert summary["repeats"] == 2 and summary["n_cases"] == 4 and summary["n_patients"] == 3
    assert summary["fold_training_seconds"] == [22.5, None] and summary["fold_epochs"] == [3, 2]
    assert summary["per_fold"]["0"] == {"n_cases": 3, "dice": pytest.approx(2.0 / 3), "hd95_mm": pytest.approx(2.5)}
    assert summary["per_fold"]["1"]["n_cases"] == 1 and summary["per_fold"]["1"]["dice"] == pytest.approx(0.8)
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(0.7) and summary["metrics"]["dice"]["n"] == 4
    low, high = summary["metrics"]["dice"]["ci95"]  # 3 patients: the fewest that get an interval
    assert low < 0.7 < high
    two_patients = table[table["patient_id"] != "p1"]
    assert summarise(two_patients, FOLDS, [[{}], [{}]], "cpu")["metrics"]["dice"]["ci95"] is None
    with pytest.raises(ValueError, match="same number"):
        summarise(table, FOLDS, [[{}], [{}, {}]], "cpu")
