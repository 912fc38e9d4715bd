"""`medseg evaluate`: a bad case is recorded in failures.csv and the others are evaluated."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np

from .conftest import (
    assert_refused,
    assert_some_failed,
    case_rows,
    leftovers,
    read_failures,
    run_cli,
    write_rows,
)


def _evaluate(pred, manifest, out):
    return run_cli("evaluate", "--pred", pred, "--manifest", manifest, "--out", out, "--no-progress")


def _split_of(manifest, case_id: str) -> str:
    with manifest.open(newline="") as fh:
        return next(row["split"] for row in csv.DictReader(fh) if row["case_id"] == case_id)


def _evaluated(out) -> list[str]:
    with (out / "metrics_per_case.csv").open(newline="") as fh:
        return [row["case_id"] for row in csv.DictReader(fh)]


def test_probability_map_missing_file_and_grid_mismatch_are_recorded(tmp_path, dataset, manifest, predictions):
    # phantom_000: a probability map saved as a mask; phantom_001: no prediction; phantom_002: fine
    mask = nib.load(str(predictions / "phantom_000_mask.nii.gz"))
    prob = np.asarray(mask.dataobj).astype(np.float32) * 0.8 + 0.1
    nib.save(nib.Nifti1Image(prob, mask.affine), str(predictions / "phantom_000_mask.nii.gz"))
    (predictions / "phantom_001_mask.nii.gz").unlink()
    out = tmp_path / "out"
    proc = _evaluate(predictions, manifest, out)
    assert_some_failed(proc)
    assert "evaluated 1 case(s)" in proc.stdout and "1 failed" in proc.stdout
    assert "1 labelled case(s) of the manifest have no prediction" in proc.stdout  # no --split: counted, not failed
    failures = read_failures(out)
    assert sorted(failures) == ["phantom_000"]
    assert failures["phantom_000"].startswith(str(predictions / "phantom_000_mask.nii.gz"))
    assert "predicted mask has non-integer values (a probability map?)" in failures["phantom_000"]
    assert _evaluated(out) == ["phantom_002"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 1 and summary["n_failed"] == 1 and summary["case_ids"] == ["phantom_002"]
    assert summary["not_predicted"] == ["phantom_001"]
    # with --split the case must have a prediction: its absence is a failure naming the file
    proc = run_cli("evaluate", "--pred", predictions, "--manifest", manifest, "--out", out, "--no-progress",
                   "--split", _split_of(manifest, "phantom_001"))
    assert_refused(proc, "phantom_001_mask.nii.gz", "not found")  # the split's only case: nothing evaluated
    assert list(read_failures(out)) == ["phantom_001"]
    assert summary["per_region"]["lesion"]["voxel"]["dice"]["mean"] == 1.0
    assert not leftovers(out)

    # a mask on another grid; the probability map fixed
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 7), np.uint8), mask.affine), str(predictions / "phantom_001_mask.nii.gz"))
    nib.save(mask, str(predictions / "phantom_000_mask.nii.gz"))
    proc = _evaluate(predictions, manifest, out)
    assert_some_failed(proc)
    failures = read_failures(out)
    assert list(failures) == ["phantom_001"] and "grid mismatch" in failures["phantom_001"]
    assert _evaluated(out) == ["phantom_000", "phantom_002"]


def test_negative_reference_values_fail_the_case(tmp_path, dataset, predictions):
    label = nib.load(str(dataset[1].label))
    array = np.asarray(label.dataobj).astype(np.int16)
    array[1, 2, 3] = -3
    path = tmp_path / "signed_label.nii.gz"
    nib.save(nib.Nifti1Image(array, label.affine), str(path))
    rows = case_rows(dataset)
    rows[1]["label"] = str(path)
    out = tmp_path / "out"
    proc = _evaluate(predictions, write_rows(tmp_path / "m.csv", rows), out)
    assert_some_failed(proc)
    failures = read_failures(out)
    assert list(failures) == ["phantom_001"] and "signed_label.nii.gz: label has negative value(s) [-3]" in failures["phantom_001"]
    assert _evaluated(out) == ["phantom_000", "phantom_002"]


def test_missing_reference_fails_its_case_and_images_are_not_needed(tmp_path, dataset, predictions):
    rows = case_rows(dataset)
    rows[0]["label"] = str(tmp_path / "gone_label.nii.gz")
    rows[2]["image_t1"] = str(tmp_path / "images are not read.nii.gz")
    out = tmp_path / "out"
    proc = _evaluate(predictions, write_rows(tmp_path / "m.csv", rows), out)
    assert_some_failed(proc)
    failures = read_failures(out)
    assert list(failures) == ["phantom_000"]
    assert "row 2 (case_id=phantom_000): column label: reference label file not found" in failures["phantom_000"]
    assert _evaluated(out) == ["phantom_001", "phantom_002"]


def test_nothing_evaluated_is_exit_2_with_the_failures_listed(tmp_path, manifest):
    empty = tmp_path / "empty_pred"
    empty.mkdir()
    out = tmp_path / "out"
    proc = _evaluate(empty, manifest, out)
    assert_refused(proc, "none of the 3 case(s) could be evaluated", "failures.csv", "phantom_000")
    assert sorted(read_failures(out)) == ["phantom_000", "phantom_001", "phantom_002"]
    assert not (out / "summary.json").exists() and not leftovers(out)
