"""The cross-validation's tables and intervals: rows in, rows and dicts out (no files).

:mod:`medseg.auto.cross_validation` trains the folds, predicts and evaluates the held-out
patients and writes what these functions return:

- :func:`first_region_rows` -- the rows of ``metrics_per_case.csv`` for the region the models
  segment (the table's first region);
- :func:`cv_table` -- ``cv_table.csv``: one row per out-of-fold case (``case_id``, ``patient_id``,
  ``fold``, ``region``, then :data:`TABLE_METRICS` present in the evaluation), sorted by fold
  then case, and a last ``mean`` row (``patient_id`` "", ``fold`` -1, ``region`` "", the
  metric means over cases, NaN skipped);
- :func:`summarise` -- the body of ``cv_summary.json``: means over cases with a 95 % patient
  bootstrap interval (:func:`patient_ci95`, :func:`medseg.metrics.uncertainty.bootstrap_mean_ci`),
  means per fold, the folds' training seconds and epochs from their ``fold_done`` records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from medseg.auto.folds import FoldAssignment
from medseg.manifest import Case
from medseg.metrics.summary import describe
from medseg.metrics.uncertainty import CI_METHOD, bootstrap_mean_ci

#: the per-case metric columns ``cv_table.csv`` keeps (those the evaluation wrote), in this order
TABLE_METRICS = ("dice", "hd95_mm", "assd_mm", "lesion_precision", "lesion_recall", "lesion_f1",
                 "ref_volume_ml", "pred_volume_ml")  # fmt: skip
#: the metrics the summary also averages per fold
FOLD_METRICS = ("dice", "hd95_mm", "lesion_f1")


def first_region_rows(metrics: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """``(region, rows)``: the first region of a ``metrics_per_case.csv`` table (the one the
    models segment; the evaluation lists it first) and that region's rows."""
    region = metrics["region"].unique().tolist()[0]
    return region, metrics[metrics["region"] == region]


def cv_table(metrics: pd.DataFrame, folds: FoldAssignment, cases: Sequence[Case]) -> pd.DataFrame:
    """Per-case rows of ``metrics`` (one region of ``metrics_per_case.csv``: ``case_id``,
    ``region`` and metric columns) with patient and fold, sorted by fold then case (stable),
    then a ``mean`` row (module docstring). Every case must be a pool case of ``folds``."""
    fold_of = folds.fold_of_patient()
    patient = {c.case_id: c.patient_id for c in cases}
    rows = metrics.copy()
    rows["case_id"] = rows["case_id"].astype(str)
    rows.insert(1, "patient_id", rows["case_id"].map(patient))
    rows.insert(2, "fold", rows["patient_id"].map(fold_of).astype(int))
    keep = ["case_id", "patient_id", "fold", "region", *[m for m in TABLE_METRICS if m in rows.columns]]
    rows = rows[keep].sort_values(["fold", "case_id"], kind="stable").reset_index(drop=True)
    mean = {"case_id": "mean", "patient_id": "", "fold": -1, "region": ""}
    mean.update({m: rows[m].mean(skipna=True) for m in keep[4:]})
    return pd.concat([rows, pd.DataFrame([mean])], ignore_index=True)


def summarise(table: pd.DataFrame, folds: FoldAssignment, fold_records: Sequence[Sequence[Mapping[str, Any]]],
              device: str) -> dict[str, Any]:  # fmt: skip
    """Out-of-fold means over cases and per fold, fold training times (``cv_summary.json``).

    ``table``: a :func:`cv_table` (its ``mean`` row is left out). ``fold_records[k][r]``: fold
    k's repeat r's ``fold_done`` record (``seconds``, ``epochs``; ``{}`` where the fold has none),
    the same number of repeats per fold. A fold's seconds add up its repeats (None if one is
    unknown); its epochs are repeat 0's.
    """
    if len(fold_records) != folds.n_folds or len({len(runs) for runs in fold_records}) != 1 or not fold_records[0]:
        raise ValueError(f"fold_records: need the same number (>= 1) of repeats for each of {folds.n_folds} folds, "
                         f"got {[len(runs) for runs in fold_records]}")  # fmt: skip
    cases = table[table["case_id"] != "mean"]
    metrics = [m for m in TABLE_METRICS if m in cases.columns]
    per_fold = {
        str(k): {"n_cases": int((cases["fold"] == k).sum()),
                 **{m: float(cases.loc[cases["fold"] == k, m].mean()) for m in FOLD_METRICS if m in metrics}}
        for k in range(folds.n_folds)
    }  # fmt: skip
    seconds = [sum(d["seconds"] for d in runs) if all(d.get("seconds") is not None for d in runs) else None
               for runs in fold_records]  # fmt: skip
    return {
        "what": "out-of-fold: every pool case predicted once by its fold's model(s), which did not train on its patient",
        "n_folds": folds.n_folds,
        "repeats": len(fold_records[0]),
        "n_cases": int(len(cases)),
        "n_patients": int(cases["patient_id"].nunique()),
        "metrics": {m: {**describe(cases[m]), "ci95": patient_ci95(cases, m)} for m in metrics},
        "ci95": CI_METHOD,
        "per_fold": per_fold,
        "fold_training_seconds": seconds,
        "fold_epochs": [runs[0].get("epochs") for runs in fold_records],
        "device": device,
    }


def patient_ci95(cases: pd.DataFrame, metric: str) -> list[float] | None:
    """95 % patient-level bootstrap interval ``[low, high]`` of the case mean of column
    ``metric`` of ``cases`` (rows with ``patient_id``; None: fewer than 3 patients with a value)."""
    ci = bootstrap_mean_ci(cases[metric].to_numpy(dtype=float), cases["patient_id"].astype(str).tolist())
    return None if ci is None else [ci[0], ci[1]]


__all__ = ["FOLD_METRICS", "TABLE_METRICS", "cv_table", "first_region_rows", "patient_ci95", "summarise"]
