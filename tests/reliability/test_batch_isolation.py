"""One failing case never stops a batch (issue 32, item 7): a case id too long for a file name
and a folder squatting on a case's output path fail that case alone, in ``failures.csv``,
with exit 1, and the other cases are done: `medseg infer`, `medseg evaluate`, `medseg stats`."""

from __future__ import annotations

import csv

import pytest

from .conftest import (
    assert_some_failed,
    case_rows,
    leftovers,
    read_failures,
    run_cli,
    write_rows,
)

LONG_ID = "x" * 250  # + "_lesions.nii.gz" and a temporary name's ".partial-<pid>": over 255 bytes


def _infer(checkpoint, manifest, out, *extra):
    return run_cli("infer", "--checkpoint", checkpoint, "--manifest", manifest, "--out", out, "--no-progress", *extra)


def test_infer_long_case_id_fails_alone(tmp_path, dataset, checkpoint):
    rows = case_rows(dataset)
    rows[0]["case_id"] = LONG_ID
    manifest = write_rows(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    proc = _infer(checkpoint, manifest, out)
    assert_some_failed(proc)
    failures = read_failures(out)
    assert list(failures) == [LONG_ID]
    assert "too long to name its files: 250 bytes" in failures[LONG_ID]
    assert "shorten the case_id" in failures[LONG_ID]
    for case_id in ("phantom_001", "phantom_002"):  # the cases after it ran
        assert (out / f"{case_id}_mask.nii.gz").is_file() and (out / f"{case_id}_complete.json").is_file()
    assert not leftovers(out)


@pytest.mark.parametrize("suffix", ["_mask.nii.gz", "_complete.json"])
def test_infer_folder_on_an_output_path_fails_its_case_alone(tmp_path, dataset, checkpoint, suffix):
    out = tmp_path / "out"
    rows = case_rows(dataset)
    assert rows[0]["split"] == "test"
    # a first run (phantom_000 only) makes the folder infer's own; then a folder squats on phantom_001's output
    assert _infer(checkpoint, write_rows(tmp_path / "m.csv", rows), out, "--split", "test").returncode == 0
    squat = out / f"phantom_001{suffix}"
    squat.mkdir()
    (squat / "keep.txt").write_text("not medseg's")
    proc = _infer(checkpoint, tmp_path / "m.csv", out)
    assert_some_failed(proc)
    failures = read_failures(out)
    assert list(failures) == ["phantom_001"]
    assert f"{squat}: a folder is in the place of this case's output file; remove or rename it" in failures["phantom_001"]
    assert (squat / "keep.txt").read_text() == "not medseg's"  # never removed
    assert [p.name for p in out.glob("phantom_001*")] == [squat.name]  # nothing else of the failed case
    assert (out / "phantom_002_mask.nii.gz").is_file() and (out / "phantom_002_complete.json").is_file()  # ran after it
    assert (out / "phantom_000_complete.json").is_file()
    assert not leftovers(out)


def test_evaluate_long_id_and_folder_on_a_mask_fail_alone(tmp_path, dataset, predictions):
    rows = case_rows(dataset)
    rows[2]["case_id"] = LONG_ID
    manifest = write_rows(tmp_path / "m.csv", rows)
    mask = predictions / "phantom_001_mask.nii.gz"
    mask.unlink()
    mask.mkdir()
    out = tmp_path / "eval"
    proc = run_cli("evaluate", "--pred", predictions, "--manifest", manifest, "--out", out, "--no-progress")
    assert_some_failed(proc)
    failures = read_failures(out)
    assert sorted(failures) == ["phantom_001", LONG_ID]
    assert f"{mask}: a folder is where case phantom_001's predicted mask should be" in failures["phantom_001"]
    assert "too long to name its files: 250 bytes" in failures[LONG_ID]
    with (out / "metrics_per_case.csv").open(newline="") as fh:
        assert {row["case_id"] for row in csv.DictReader(fh)} == {"phantom_000"}


def test_stats_long_case_id_is_just_a_row(tmp_path, dataset):
    """stats makes no file from a case id: a long one is computed like any other."""
    rows = case_rows(dataset)
    rows[1]["case_id"] = LONG_ID
    manifest = write_rows(tmp_path / "m.csv", rows)
    out = tmp_path / "stats"
    proc = run_cli("stats", manifest, "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert read_failures(out) == {}
    with (out / "case_stats.csv").open(newline="") as fh:
        assert [row["case_id"] for row in csv.DictReader(fh)] == ["phantom_000", LONG_ID, "phantom_002"]
