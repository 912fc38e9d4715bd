"""Messages that say what to do (issue 36, point 4): an unknown config key lists its section's
valid keys, closest first; a foreground value that no label holds is refused naming the values
that occur; ``evaluate`` without ``--split`` scores the predicted cases and counts the others."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medseg.manifest import read_manifest
from medseg.outputs import MASK_SUFFIX


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m medseg.cli ARGS`` (one OpenMP thread), output captured as text."""
    return subprocess.run([sys.executable, "-m", "medseg.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, check=False)  # fmt: skip


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one ``error:`` line of a refused command (exit 2, no traceback)."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return line


@pytest.fixture(scope="module")
def manifest(phantom_manifest) -> Path:
    """Three small phantoms (2 train, 1 val) whose labels hold 0 and 1."""
    return phantom_manifest(3, (48, 44, 12), seed=1, val_fraction=0.34, test_fraction=0)


def tiny_config(path: Path, manifest: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "data": {"manifest": str(manifest)},
        "model": {"arch": "unet", "encoder": "unet", "in_channels": 6, "width": 0.125},
        "train": {"epochs": 1, "samples_per_epoch": 8, "batch_size": 4, "patch_size": [48, 48], "num_workers": 0,
                  "threads": 1, "amp": "off"}}))  # fmt: skip
    return path


def test_unknown_key_lists_the_valid_keys_closest_first(manifest, tmp_path):
    line = error_line(run_cli("train", tiny_config(tmp_path / "c.yaml", manifest), "--set", "model.widht=0.5"))
    assert line.startswith("error: ") and ": model.widht: unknown key; valid keys of model: width, " in line
    valid = line.split("valid keys of model: ")[1].split(", ")
    assert sorted(valid) == sorted(
        ["arch", "encoder", "in_channels", "out_channels", "width", "decoder_channels", "residual", "inception_branches",
         "output_stride", "aspp_rates", "aspp_channels", "dropout", "norm", "anchor_sizes", "options", "pretrained",
         "pretrained_map", "pretrained_strict"])  # fmt: skip
    line = error_line(run_cli("stats", manifest, "--out", tmp_path / "s", "--set", "train.optimizer.lrr=0.1"))
    assert line.endswith("train.optimizer.lrr: unknown key; valid keys of train.optimizer: lr, " +
                         "nesterov, weight_decay, name, momentum")  # fmt: skip


def test_training_refuses_a_foreground_value_no_label_holds(manifest, tmp_path):
    proc = run_cli("train", tiny_config(tmp_path / "c.yaml", manifest), "--out", tmp_path / "run", "--no-progress",
                   "--set", "data.labels.foreground=[3]")  # fmt: skip
    assert error_line(proc) == (
        "error: data.labels.foreground [3] occurs in none of the 2 training label(s); the values they hold: 0, 1; "
        "set data.labels.foreground to some of these (--set data.labels.foreground=[1] or nonzero)")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_stats_refuses_a_foreground_value_no_label_holds(manifest, tmp_path):
    proc = run_cli("stats", manifest, "--out", tmp_path / "s", "--no-progress", "--set", "data.labels.foreground=[3]")
    assert proc.returncode != 0
    assert "data.labels.foreground [3] occurs in none of the 3 manifest label(s); the values they hold: 0, 1" in proc.stderr


def test_evaluate_without_split_scores_the_predicted_cases(manifest, tmp_path):
    cases = read_manifest(manifest)
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in cases[:2]:  # the third case was never predicted
        shutil.copy(case.label, pred / f"{case.case_id}{MASK_SUFFIX}")
    out = tmp_path / "eval"
    proc = run_cli("evaluate", "--pred", pred, "--manifest", manifest, "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert (f"evaluated 2 case(s) -> {out}; 1 labelled case(s) of the manifest have no prediction in {pred} "
            "(not scored; --split S to require every case of split S)") in proc.stdout  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_failed"] == 0 and summary["not_predicted"] == [cases[2].case_id]
    assert pd.read_csv(out / "failures.csv").empty
    assert sorted(pd.read_csv(out / "metrics_per_case.csv")["case_id"]) == sorted(c.case_id for c in cases[:2])
    # with --split, every case of the split must have a prediction: the missing one fails (exit 1)
    split = cases[2].split
    proc = run_cli("evaluate", "--pred", pred, "--manifest", manifest, "--out", out, "--split", split, "--no-progress")
    assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stderr
