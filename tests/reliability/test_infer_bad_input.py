"""`medseg infer`: a NaN model and a missing image fail their cases, not the batch."""

from __future__ import annotations

from conftest import save_tiny_checkpoint

from .conftest import CHANNELS, assert_some_failed, case_rows, leftovers, read_failures, run_cli, write_rows


def test_nan_weights_fail_each_case_clearly_and_leave_no_file(tmp_path, manifest):
    checkpoint = save_tiny_checkpoint(tmp_path / "nan.pt", CHANNELS, "MR", inference={"threads": 1}, nan_weights=True)
    out = tmp_path / "out"
    proc = run_cli("infer", "--checkpoint", checkpoint, "--manifest", manifest, "--split", "test", "--out", out,
                   "--no-progress", "--write-prob")
    assert_some_failed(proc)
    failures = read_failures(out)
    assert list(failures) == ["phantom_000"]
    assert "non-finite probabilities from the model: check the checkpoint" in failures["phantom_000"]
    assert "nan.pt" in failures["phantom_000"]
    assert not list(out.glob("phantom_*")), sorted(p.name for p in out.iterdir())  # no mask, no NaN prob map
    assert not leftovers(out)


def test_missing_image_fails_its_case_only(tmp_path, dataset, checkpoint):
    rows = case_rows(dataset)
    rows[0]["split"] = rows[1]["split"] = "test"
    rows[1]["image_flair"] = str(tmp_path / "gone_flair.nii.gz")
    rows[0]["label"] = str(tmp_path / "labels are not needed.nii.gz")
    manifest = write_rows(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    proc = run_cli("infer", "--checkpoint", checkpoint, "--manifest", manifest, "--split", "test", "--out", out,
                   "--no-progress")
    assert_some_failed(proc)
    failures = read_failures(out)
    assert list(failures) == ["phantom_001"]
    assert "row 3 (case_id=phantom_001): column image_flair: file not found" in failures["phantom_001"]
    assert "gone_flair.nii.gz" in failures["phantom_001"]
    assert (out / "phantom_000_mask.nii.gz").is_file() and not list(out.glob("phantom_001*"))
    assert not leftovers(out)
