"""Manifest rules every command applies (``medseg.manifest.read_manifest``): a patient in one
split only, case ids that can name a file; a missing file fails training's manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.errors import ManifestError
from medseg.manifest import Case, read_manifest

from .conftest import assert_refused, case_rows, run_cli, write_rows


def _command(name: str, manifest: Path, out: Path, pred: Path, checkpoint: Path) -> list[str | Path]:
    return {
        "stats": ["stats", manifest, "--out", out, "--no-progress"],
        "evaluate": ["evaluate", "--pred", pred, "--manifest", manifest, "--out", out, "--no-progress"],
        "infer": ["infer", "--checkpoint", checkpoint, "--manifest", manifest, "--out", out, "--no-progress"],
    }[name]


@pytest.mark.parametrize("command", ["stats", "evaluate", "infer"])
def test_patient_in_two_splits_is_refused_by_every_command(tmp_path, dataset, predictions, checkpoint, command):
    rows = case_rows(dataset)  # rows 2, 3, 4 of the CSV: splits test, train, val
    rows[1]["patient_id"] = rows[0]["patient_id"]
    manifest = write_rows(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    proc = run_cli(*_command(command, manifest, out, predictions, checkpoint))
    assert_refused(proc, "m.csv", f"patient_id {rows[0]['patient_id']!r} is in more than one split",
                   "test (row 2)", "train (row 3)")
    assert not out.exists()


def test_patient_rows_in_one_split_or_unassigned_are_fine(tmp_path, dataset):
    rows = case_rows(dataset)
    rows[1]["patient_id"] = rows[2]["patient_id"] = rows[0]["patient_id"]
    rows[1]["split"], rows[2]["split"] = "test", ""
    assert len(read_manifest(write_rows(tmp_path / "m.csv", rows))) == 3


@pytest.mark.parametrize(("case_id", "command"), [
    ("../outside", "evaluate"), ("sub/case", "evaluate"), ("sub\\case", "evaluate"), (".hidden", "evaluate"),
    ("..", "evaluate"), ("../outside", "infer"),
])
def test_case_id_that_is_not_a_file_name_is_refused(tmp_path, dataset, predictions, checkpoint, case_id, command):
    rows = case_rows(dataset)
    rows[2]["case_id"] = case_id
    manifest = write_rows(tmp_path / "m.csv", rows)
    if command == "evaluate":  # what the id would reach outside --pred
        (tmp_path / "outside_mask.nii.gz").write_bytes((predictions / f"{dataset[2].case_id}_mask.nii.gz").read_bytes())
    out = tmp_path / "out"
    proc = run_cli(*_command(command, manifest, out, predictions, checkpoint))
    assert_refused(proc, f"row 4 (case_id={case_id}): column case_id: case id {case_id!r} cannot name a file")
    assert not out.exists()


def test_training_still_needs_every_file(tmp_path, dataset):
    rows = case_rows(dataset)
    rows[1]["image_t1"] = str(tmp_path / "gone_t1.nii.gz")
    with pytest.raises(ManifestError, match=r"row 3 \(case_id=phantom_001\): column image_t1: file not found: .*gone_t1"):
        read_manifest(write_rows(tmp_path / "m.csv", rows))


def test_row_numbers_are_kept_on_cases(dataset: list[Case]):
    assert [c.row for c in dataset] == [2, 3, 4] and dataset[0].where == f"row 2 (case_id={dataset[0].case_id})"
