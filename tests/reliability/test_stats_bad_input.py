"""`medseg stats` with a missing file or negative label values: that case fails, the others run."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np

from .conftest import assert_some_failed, case_rows, leftovers, read_failures, run_cli, write_rows


def _done(out) -> list[str]:
    with (out / "case_stats.csv").open(newline="") as fh:
        return [row["case_id"] for row in csv.DictReader(fh)]


def test_missing_file_fails_its_case_only(tmp_path, dataset):
    rows = case_rows(dataset)
    rows[1]["label"] = str(tmp_path / "gone_label.nii.gz")
    out = tmp_path / "out"
    proc = run_cli("stats", write_rows(tmp_path / "m.csv", rows), "--out", out, "--no-progress")
    assert_some_failed(proc)
    failures = read_failures(out)
    assert list(failures) == ["phantom_001"]
    assert "row 3 (case_id=phantom_001): column label: file not found" in failures["phantom_001"]
    assert "gone_label.nii.gz" in failures["phantom_001"]
    assert _done(out) == ["phantom_000", "phantom_002"]
    assert not leftovers(out)


def _negative_label(tmp_path, dataset):
    source = nib.load(str(dataset[0].label))
    array = np.asarray(source.dataobj).astype(np.int16)
    array[0, 0, 0] = -1
    path = tmp_path / "negative_label.nii.gz"
    nib.save(nib.Nifti1Image(array, source.affine), str(path))
    rows = case_rows(dataset)
    rows[0]["label"] = str(path)
    return write_rows(tmp_path / "m.csv", rows)


def test_negative_label_values_are_an_error_naming_the_file(tmp_path, dataset):
    out = tmp_path / "out"
    proc = run_cli("stats", _negative_label(tmp_path, dataset), "--out", out, "--no-progress")
    assert_some_failed(proc)
    failures = read_failures(out)
    assert list(failures) == ["phantom_000"]
    assert "negative_label.nii.gz: label has negative value(s) [-1]" in failures["phantom_000"]
    assert _done(out) == ["phantom_001", "phantom_002"]


def test_negative_label_values_listed_in_the_config_are_accepted(tmp_path, dataset):
    out = tmp_path / "out"
    proc = run_cli("stats", _negative_label(tmp_path, dataset), "--out", out, "--no-progress",
                   "--set", "data.labels.allowed_values=[-1,0,1]")
    assert proc.returncode == 0, proc.stderr
    assert not read_failures(out) and _done(out) == ["phantom_000", "phantom_001", "phantom_002"]
