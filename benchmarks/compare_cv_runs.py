"""Run-to-run spread of a cross-validation, and what averaging two runs' models gives out-of-fold.

Two ``pipelines/auto.yaml`` runs on the same patients (e.g. the same plan with another
``train.seed``) each score every patient once, out-of-fold. This prints, for the plan's
post-processing rule (``cv/cv_table.csv``) and for each run's rule chosen on CV
(``model/cv_chosen/cv_table.csv``):

- each run's mean Dice and HD95 with its 95 % patient-bootstrap interval;
- the paired per-patient Dice differences B - A: mean, 95 % bootstrap interval, patients better
  and worse, the largest moves, and the run-to-run standard deviation of one patient's Dice
  (RMS of the differences / sqrt 2);
- the per-fold means of both runs (a fold's mean is what one split would have reported).

Then the **two-run ensemble out-of-fold**: for every patient the two runs' out-of-fold
probability maps (``cv/oof/<case>_prob.nii.gz``, each from a model that did not train on the
patient) are averaged and post-processed with run A's plan rule and with run A's chosen rule,
then scored against the reference. That measures, on patients no model saw, what averaging
independently trained models does, the principle behind the model folder's fold ensemble.
A's chosen rule was picked on A's out-of-fold predictions alone, not on the ensemble's.
Usage::

    .venv/bin/python benchmarks/compare_cv_runs.py runs/auto_brats_v8 runs/auto_brats_v9
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from medseg.config import load_config
from medseg.inference.postprocess import postprocess
from medseg.io import read_volume
from medseg.labels import read_label
from medseg.manifest import read_manifest
from medseg.metrics.uncertainty import bootstrap_mean_ci
from medseg.metrics.voxel import voxel_metrics
from medseg.outputs import prob_file

TABLES = {"plan's rule": Path("cv") / "cv_table.csv", "chosen rule": Path("model") / "cv_chosen" / "cv_table.csv"}


def _cases(run: Path, table: Path) -> pd.DataFrame:
    frame = pd.read_csv(run / table, dtype={"case_id": str, "patient_id": str})
    return frame[frame["case_id"] != "mean"].set_index("case_id")


def _ci(values: pd.Series | np.ndarray, patients: pd.Series | np.ndarray | None = None, fmt: str = "{:.3f}") -> str:
    ci = bootstrap_mean_ci(np.asarray(values, dtype=float), None if patients is None else list(patients))
    return "n/a" if ci is None else f"{fmt.format(ci[0])} to {fmt.format(ci[1])}"


def compare_tables(run_a: Path, run_b: Path, table: Path, label: str) -> None:
    """Means with intervals, paired Dice differences, run-to-run spread and per-fold means."""
    a, b = _cases(run_a, table), _cases(run_b, table)
    common = a.index.intersection(b.index)
    if len(common) < len(a.index.union(b.index)):
        print(f"  only the {len(common)} case(s) scored in both runs are compared")
    a, b = a.loc[common], b.loc[common]
    print(f"\n{label} ({table}), {len(common)} case(s):")
    for name, frame in (("A", a), ("B", b)):
        print(f"  {name}: mean Dice {frame['dice'].mean():.4f} (95 % CI {_ci(frame['dice'], frame['patient_id'])}), "
              f"HD95 {frame['hd95_mm'].mean():.2f} mm (95 % CI {_ci(frame['hd95_mm'], frame['patient_id'], '{:.1f}')})")  # fmt: skip
    diff = b["dice"] - a["dice"]
    print(f"  B - A per patient: mean {diff.mean():+.4f} (95 % CI {_ci(diff, a['patient_id'], '{:+.3f}')}), "
          f"{int((diff > 0).sum())} better, {int((diff < 0).sum())} worse; run-to-run SD of one patient's Dice "
          f"{np.sqrt(np.mean(diff**2) / 2):.3f}")  # fmt: skip
    for case_id in diff.abs().sort_values(ascending=False).index[:3]:
        print(f"    {case_id}: {a.loc[case_id, 'dice']:.3f} -> {b.loc[case_id, 'dice']:.3f}")
    folds = sorted(set(a["fold"]))
    if (a["fold"] == b["fold"]).all():
        per_fold = [(k, a.loc[a["fold"] == k, "dice"].mean(), b.loc[b["fold"] == k, "dice"].mean()) for k in folds]
        print("  per fold (A -> B): " + ", ".join(f"{k}: {x:.3f} -> {y:.3f}" for k, x, y in per_fold))
        spread = np.array([y - x for _, x, y in per_fold])
        print(f"  largest per-fold change {np.abs(spread).max():.3f}")
    else:
        print("  the runs' folds differ: no per-fold comparison")


def ensemble_oof(run_a: Path, run_b: Path) -> pd.DataFrame:
    """Per case: Dice and HD95 of A, B and their averaged probabilities, with A's plan and chosen rules."""
    cfg = load_config(run_a / "model" / "config.yaml")
    selection = json.loads((run_a / "model" / "postprocess.json").read_text())
    rules = {"plan's rule": cfg.inference.model_copy(update=selection["current"]),
             "chosen rule": cfg.inference.model_copy(update=selection["chosen"])}  # fmt: skip
    cases = {c.case_id: c for c in read_manifest(run_a / "import" / "manifest.csv")}
    rows = []
    for case_id in sorted(_cases(run_a, TABLES["plan's rule"]).index):
        paths = [prob_file(run / "cv" / "oof", case_id) for run in (run_a, run_b)]
        if not all(p.is_file() for p in paths) or cases.get(case_id) is None or cases[case_id].label is None:
            continue
        probs = [read_volume(p) for p in paths]
        ref = read_label(cases[case_id].label, cfg.data.labels).array > 0
        spacing = probs[0].spacing
        averaged = (probs[0].array.astype(np.float32) + probs[1].array.astype(np.float32)) / 2.0
        for rule_name, rule in rules.items():
            for source, prob in (("A", probs[0].array), ("B", probs[1].array), ("A+B", averaged)):
                scores = voxel_metrics(postprocess(prob, spacing, rule) > 0, ref, spacing)
                rows.append({"case_id": case_id, "patient_id": cases[case_id].patient_id, "rule": rule_name,
                             "source": source, "dice": scores.dice, "hd95_mm": scores.hd95_mm})  # fmt: skip
        print(".", end="", flush=True)
    print()
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path, help="an auto.yaml run folder (cv/, model/, import/)")
    parser.add_argument("run_b", type=Path, help="a second run on the same patients")
    parser.add_argument("--no-ensemble", action="store_true", help="skip the two-run ensemble (reads every probability map)")
    args = parser.parse_args(argv)
    print(f"A = {args.run_a}, B = {args.run_b}")
    for label, table in TABLES.items():
        if (args.run_a / table).is_file() and (args.run_b / table).is_file():
            compare_tables(args.run_a, args.run_b, table, label)
    if args.no_ensemble:
        return 0
    print("\ntwo-run ensemble out-of-fold (A's rules, rescored here from the probability maps)", end="")
    scores = ensemble_oof(args.run_a, args.run_b)
    for rule_name, group in scores.groupby("rule", sort=False):
        print(f"  {rule_name}:")
        by_source = {source: frame.set_index("case_id") for source, frame in group.groupby("source", sort=False)}
        for source, frame in by_source.items():
            print(f"    {source:>3}: mean Dice {frame['dice'].mean():.4f} (95 % CI {_ci(frame['dice'], frame['patient_id'])}), "
                  f"HD95 {frame['hd95_mm'].mean():.2f} mm")  # fmt: skip
        gain = by_source["A+B"]["dice"] - (by_source["A"]["dice"] + by_source["B"]["dice"]) / 2
        print(f"    A+B minus the mean of A and B, per patient: {gain.mean():+.4f} "
              f"(95 % CI {_ci(gain, by_source['A']['patient_id'], '{:+.3f}')}), {int((gain > 0).sum())} of {len(gain)} better")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
