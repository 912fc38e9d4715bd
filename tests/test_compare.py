"""`medseg compare`: paired comparison of runs on constructed CV and evaluation tables."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import write_tiny_config

from medseg.cli import main

# 10 patients, 12 cases: p0 and p1 have two scans each; 3 folds
CASES = [f"c{i:02d}" for i in range(12)]
PATIENTS = ["p0", "p0", "p1", "p1"] + [f"p{i}" for i in range(2, 10)]
FOLDS = [0, 0, 1, 1, 2, 0, 1, 2, 0, 1, 2, 2]
BASE_DICE = np.round(np.linspace(0.55, 0.9, 12), 4)
# Dice change per patient: p0..p6 better by 0.05, p7 and p8 worse by 0.02, p9 unchanged
DICE_STEP = {**{f"p{i}": 0.05 for i in range(7)}, "p7": -0.02, "p8": -0.02, "p9": 0.0}


def cv_table(dice: np.ndarray, hd95: np.ndarray, f1: np.ndarray, folds: list[int] = FOLDS) -> pd.DataFrame:
    """A cv_table.csv as medseg.auto.cross_validation writes it: per-case rows then a ``mean`` row."""
    rows = pd.DataFrame({"case_id": CASES, "patient_id": PATIENTS, "fold": folds, "region": "lesion", "dice": dice,
                         "hd95_mm": hd95, "lesion_f1": f1})  # fmt: skip
    mean = {"case_id": "mean", "patient_id": "", "fold": -1, "region": "", "dice": dice.mean(),
            "hd95_mm": hd95.mean(), "lesion_f1": f1.mean()}  # fmt: skip
    return pd.concat([rows, pd.DataFrame([mean])], ignore_index=True)


@pytest.fixture
def cv_runs(tmp_path):
    """Run A: a pipeline run started from a manifest (cv/cv_table.csv, no import/ folder);
    run B: a ``medseg cv --out`` folder (cv_table.csv in the folder itself)."""
    hd95 = np.linspace(3.0, 14.0, 12)
    f1 = np.linspace(0.4, 0.95, 12)
    dice_b = BASE_DICE + np.array([DICE_STEP[p] for p in PATIENTS])
    dice_b[PATIENTS.index("p9")] = BASE_DICE[PATIENTS.index("p9")]  # exactly equal: a tie
    run_a, run_b = tmp_path / "run_a", tmp_path / "cv_b"
    (run_a / "cv").mkdir(parents=True)
    run_b.mkdir()
    (run_a / "state.json").write_text("{}")
    cv_table(BASE_DICE, hd95, f1).to_csv(run_a / "cv" / "cv_table.csv", index=False)
    cv_table(dice_b, hd95 - 1.0, f1).to_csv(run_b / "cv_table.csv", index=False)
    return run_a, run_b, dice_b - BASE_DICE


def eval_table(case_ids: list[str], dice: list[float], second_region_dice: float) -> pd.DataFrame:
    """metrics_per_case.csv: one row per (case, region), no patient_id; the second region's rows
    hold values that must not be compared."""
    first = pd.DataFrame({"case_id": case_ids, "region": "whole", "dice": dice, "hd95_mm": 5.0, "empty": False})
    second = first.assign(region="core", dice=second_region_dice, hd95_mm=99.0)
    return pd.concat([first, second], ignore_index=True).sort_values("case_id", kind="stable")


def test_two_cv_runs(cv_runs, tmp_path, capsys):
    run_a, run_b, case_diff = cv_runs
    out = tmp_path / "cmp"
    assert main(["compare", str(run_a), str(run_b), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| run - baseline |" in printed and "7 / 2 / 1" in printed  # Dice: 7 patients better, 2 worse, 1 tied
    assert "10 / 0 / 0" in printed  # HD95 one mm lower for every patient: lower is better
    assert "Per fold" in printed

    from medseg.comparison import compare_runs, read_run

    result = compare_runs([read_run(run_a), read_run(run_b)])
    assert result.metrics == ["dice", "hd95_mm", "lesion_f1"]
    dice = result.differences.set_index("metric").loc["dice"]
    assert dice["mean_difference"] == pytest.approx(case_diff.mean())  # over cases, by hand
    assert dice["ci_low"] <= case_diff.mean() <= dice["ci_high"]
    assert dice["ci_low"] < dice["ci_high"]
    assert (dice["wins"], dice["losses"], dice["ties"], dice["n_patients"]) == (7, 2, 1, 10)
    hd95 = result.differences.set_index("metric").loc["hd95_mm"]
    assert hd95["mean_difference"] == pytest.approx(-1.0)
    assert hd95["ci_low"] - 1e-9 <= -1.0 <= hd95["ci_high"] + 1e-9
    f1 = result.differences.set_index("metric").loc["lesion_f1"]
    assert (f1["wins"], f1["losses"], f1["ties"]) == (0, 0, 10)
    fold0 = result.per_fold[(result.per_fold["metric"] == "dice") & (result.per_fold["fold"] == 0)].iloc[0]
    in_fold0 = np.array(FOLDS) == 0
    assert fold0["difference"] == pytest.approx(case_diff[in_fold0].mean())
    assert fold0["n_cases"] == in_fold0.sum()

    assert (out / "compare.md").read_text().startswith("# Run comparison")
    page = (out / "compare.html").read_text()
    assert 'src="data:image/png;base64,' in page and "7 / 2 / 1" in page
    table = pd.read_csv(out / "paired_differences.csv", dtype={"patient_id": str})
    assert len(table) == 3 * 10  # metric x patient
    p0 = table[(table["metric"] == "dice") & (table["patient_id"] == "p0")].iloc[0]
    assert p0["difference"] == pytest.approx(0.05) and p0["n_cases"] == 2
    # a second run into its own folder is allowed
    assert main(["compare", str(run_a), str(run_b), "--out", str(out)]) == 0


def test_two_evaluation_runs_first_region_cases_left_out(tmp_path, capsys):
    run_a, run_b = tmp_path / "pipeline_run", tmp_path / "eval_b"
    (run_a / "evaluate").mkdir(parents=True)
    run_b.mkdir()
    dice_a = [0.5, 0.6, 0.7, 0.8, 0.9]
    dice_b = [0.6, 0.5, 0.8, 0.9, 0.0]  # c4 is not in run A: left out
    eval_table(["c0", "c1", "c2", "c3", "c9"], dice_a, 0.1).to_csv(run_a / "evaluate" / "metrics_per_case.csv", index=False)
    eval_table(["c0", "c1", "c2", "c3", "c4"], dice_b, 0.99).to_csv(run_b / "metrics_per_case.csv", index=False)
    assert main(["compare", str(run_a), str(run_b), "--metric", "dice"]) == 0
    printed = capsys.readouterr().out
    assert "4 case(s) of 4 patient(s)" in printed
    assert "3 / 1 / 0" in printed  # c0, c2, c3 better, c1 worse
    assert "hd95_mm" not in printed.split("## Means")[1]  # only the metric asked for

    from medseg.comparison import compare_runs, read_run

    runs = [read_run(run_a), read_run(run_b)]
    assert runs[0].region == "whole" and not runs[0].has_patients
    result = compare_runs(runs, ["dice"])
    assert result.runs["left_out"].tolist() == [1, 1]
    expected = np.mean([0.6 - 0.5, 0.5 - 0.6, 0.8 - 0.7, 0.9 - 0.8])
    row = result.differences.iloc[0]
    assert row["mean_difference"] == pytest.approx(expected)
    assert row["ci_low"] <= expected <= row["ci_high"]
    assert result.per_fold.empty
    assert "every case is its own patient" in " ".join(result.notes)


def test_cv_against_evaluation_run_takes_patients_from_the_cv_table(cv_runs, tmp_path):
    run_a, _, _ = cv_runs
    run_c = tmp_path / "eval_c"
    run_c.mkdir()
    eval_table(CASES, list(BASE_DICE + 0.1), 0.0).to_csv(run_c / "metrics_per_case.csv", index=False)

    from medseg.comparison import compare_runs, read_run

    result = compare_runs([read_run(run_c), read_run(run_a)], ["dice"])
    assert result.n_patients == 10
    assert result.differences.iloc[0]["mean_difference"] == pytest.approx(-0.1)
    assert result.per_fold.empty  # the baseline is not a CV run


def test_three_runs(cv_runs, tmp_path, capsys):
    run_a, run_b, _ = cv_runs
    assert main(["compare", str(run_a), str(run_b), str(run_b)]) == 0
    printed = capsys.readouterr().out
    assert f"{run_b} #3" in printed  # the same folder twice is named apart


def test_folder_without_tables_is_one_line(tmp_path, cv_runs):
    run_a, _, _ = cv_runs
    empty = tmp_path / "empty_run"
    (empty / "import").mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-m", "medseg", "compare", str(run_a), str(empty)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(empty) in lines[0] and "cv_table.csv" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("problem", ["missing", "few_cases", "no_common", "metric", "one_run", "bad_column"])
def test_refusals_are_one_line(problem, cv_runs, tmp_path, capsys):
    run_a, run_b, _ = cv_runs
    other = tmp_path / "other"
    other.mkdir()
    argv = ["compare", str(run_a), str(other)]
    if problem == "missing":
        argv = ["compare", str(run_a), str(tmp_path / "nowhere")]
    elif problem == "few_cases":
        eval_table(["c00", "c01", "zz"], [0.1, 0.2, 0.3], 0.0).to_csv(other / "metrics_per_case.csv", index=False)
    elif problem == "no_common":
        eval_table(["x1", "x2", "x3"], [0.1, 0.2, 0.3], 0.0).to_csv(other / "metrics_per_case.csv", index=False)
    elif problem == "metric":
        argv = ["compare", str(run_a), str(run_b), "--metric", "volume"]
    elif problem == "one_run":
        argv = ["compare", str(run_a)]
    elif problem == "bad_column":
        pd.DataFrame({"case_id": CASES, "dice": ["high"] * 12}).to_csv(other / "metrics_per_case.csv", index=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    expected = {"missing": "nowhere", "few_cases": "only 2 case(s)", "no_common": "share no case", "metric": "unknown metric",
                "one_run": "at least two", "bad_column": "not a number"}[problem]  # fmt: skip
    assert expected in err[0]


def test_out_folder_of_another_command_is_refused(cv_runs, tmp_path, capsys):
    run_a, run_b, _ = cv_runs
    foreign = tmp_path / "labels"
    foreign.mkdir()
    (foreign / "keep.nii.gz").write_bytes(b"x")
    assert main(["compare", str(run_a), str(run_b), "--out", str(foreign)]) == 2
    assert "did not write" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.nii.gz"]


def test_help_lists_the_command():
    proc = subprocess.run([sys.executable, "-m", "medseg", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "compare" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "medseg", "compare", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "paired_differences.csv" in proc.stdout, proc.stderr


@pytest.mark.slow  # two 2-fold CVs, two inferences and evaluations of phantoms: ~60 s on 2 cores
def test_compare_real_cv_and_evaluation_runs_of_phantoms(tmp_path, phantom_manifest):
    """`medseg compare` as a user runs it: on two `medseg cv` folders (seeds 0 and 1) and on two
    `medseg evaluate` folders of their fold-0 models' predictions, through the CLI subprocess."""
    manifest = phantom_manifest(5, (48, 44, 16), seed=3, val_fraction=0.0, test_fraction=0.0)
    runs = []
    for seed in (0, 1):
        config = write_tiny_config(tmp_path / f"cv_{seed}.yaml", manifest, {
            "train": {"seed": seed}, "inference": {"min_lesion_mm3": 0.0}, "cv": {"folds": 2}})  # fmt: skip
        assert main(["cv", str(config), "--out", str(tmp_path / f"cv_{seed}"), "--no-progress"]) == 0
        pred, ev = tmp_path / f"pred_{seed}", tmp_path / f"eval_{seed}"
        assert main(["infer", "--checkpoint", str(tmp_path / f"cv_{seed}" / "fold_0" / "last.pt"), "--manifest",
                     str(manifest), "--out", str(pred), "--no-progress"]) == 0  # fmt: skip
        assert main(["evaluate", "--pred", str(pred), "--manifest", str(manifest), "--out", str(ev), "--no-progress"]) == 0
        runs.append((tmp_path / f"cv_{seed}", ev))
    for a, b, what in ((runs[0][0], runs[1][0], "cv"), (runs[0][1], runs[1][1], "evaluate")):
        out = tmp_path / f"cmp_{what}"
        proc = subprocess.run([sys.executable, "-m", "medseg", "compare", str(a), str(b), "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        table = pd.read_csv(out / "paired_differences.csv")
        assert len(table) >= 5 and {"compare.md", "compare.html"} <= {p.name for p in out.iterdir()}
        assert "95 %" in (out / "compare.md").read_text() and "patients" in proc.stdout
