"""A command never overwrites what it did not write (issue 32, part 2): its ``--out`` must be
empty, hold its own earlier run (the marker it writes) or be given with ``--overwrite``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from medseg.errors import OutputError
from medseg.run_folder import LOCK_NAME, OWNER_NAME, check_output_owner, folder_owner

from .conftest import assert_refused, leftovers, run_cli


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_infer_into_the_labels_folder_is_refused(predictions, manifest, checkpoint):
    """``predictions`` holds ``<case>_mask.nii.gz`` files infer did not write (the labels)."""
    before = _snapshot(predictions)
    proc = run_cli("infer", "--checkpoint", checkpoint, "--manifest", manifest, "--out", predictions, "--no-progress")
    line = assert_refused(proc, str(predictions), "files medseg infer did not write", "_mask.nii.gz", "--overwrite")
    assert "predicted" not in proc.stderr, line
    assert _snapshot(predictions) == before  # no label touched, no marker, no lock


def test_stats_into_a_training_run_is_refused(tmp_path, manifest):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train: {epochs: 50}\n")
    (run / "last.pt").write_bytes(b"weights")
    before = _snapshot(run)
    proc = run_cli("stats", manifest, "--out", run, "--no-progress")
    assert_refused(proc, str(run), "files medseg stats did not write", "config.yaml", "last.pt")
    assert _snapshot(run) == before


def test_evaluate_into_infers_output_is_refused_naming_its_owner(tmp_path, manifest, checkpoint, predictions):
    pred = tmp_path / "infer_out"
    first = run_cli("infer", "--checkpoint", checkpoint, "--manifest", manifest, "--out", pred, "--no-progress")
    assert first.returncode == 0, first.stderr
    assert folder_owner(pred) == "medseg infer"
    before = _snapshot(pred)
    proc = run_cli("evaluate", "--pred", pred, "--manifest", manifest, "--out", pred, "--no-progress")
    assert_refused(proc, str(pred), "holds the output of medseg infer", "failures.csv", "--overwrite")
    assert _snapshot(pred) == before  # infer's failures.csv kept
    again = run_cli("infer", "--checkpoint", checkpoint, "--manifest", manifest, "--out", pred, "--no-progress")
    assert again.returncode == 0, again.stderr  # infer's own folder: a rerun is welcome (cases skipped)


def test_rerun_of_the_same_command_and_overwrite_are_accepted(tmp_path, manifest):
    out = tmp_path / "stats"
    assert run_cli("stats", manifest, "--out", out, "--no-progress").returncode == 0
    assert json.loads((out / OWNER_NAME).read_text())["command"] == "medseg stats"
    assert run_cli("stats", manifest, "--out", out, "--no-progress").returncode == 0  # its own earlier run
    assert not leftovers(out) and not (out / LOCK_NAME).exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    proc = run_cli("stats", manifest, "--out", foreign, "--no-progress", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (foreign / "notes.txt").read_text() == "mine"  # --overwrite replaces same names only
    assert folder_owner(foreign) == "medseg stats"  # and the folder is now stats'


def test_synth_into_a_foreign_folder_is_refused_and_its_own_rerun_accepted(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "phantom_000_label.nii.gz").write_bytes(b"a hand-drawn label")
    assert_refused(run_cli("synth", "--out", data, "--n", "1", "--shape", "16", "16", "4"), str(data), "--overwrite")
    assert (data / "phantom_000_label.nii.gz").read_bytes() == b"a hand-drawn label"
    fresh = tmp_path / "fresh"
    for _ in range(2):
        proc = run_cli("synth", "--out", fresh, "--n", "1", "--shape", "16", "16", "4")
        assert proc.returncode == 0, proc.stderr
    assert folder_owner(fresh) == "medseg synth"


def test_a_refused_run_leaves_no_marker_or_folder(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,patient_id,modality,image_t1,label,split\nc1,p1,XR,a.nii.gz,,\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_refused(run_cli("stats", bad, "--out", empty, "--no-progress"), "XR")
    assert list(empty.iterdir()) == []  # the empty folder stays empty: no claim on it
    assert_refused(run_cli("stats", bad, "--out", tmp_path / "new", "--no-progress"), "XR")
    assert not (tmp_path / "new").exists()


def test_ownership_rule(tmp_path):
    """In process: what counts as content, the marker, a pipeline run folder of before markers."""
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / LOCK_NAME).write_text("{}")
    (folder / ".x.partial-123.nii.gz").write_bytes(b"")  # a killed run's temporary file
    check_output_owner(folder, "medseg infer")  # nothing of substance: free
    (folder / "state.json").write_text("{}")
    check_output_owner(folder, "medseg run pipelines/demo.yaml")  # an older pipeline run folder
    with pytest.raises(OutputError, match="files medseg infer did not write \\(state.json\\)"):
        check_output_owner(folder, "medseg infer")
    check_output_owner(folder, "medseg infer", overwrite=True)
    (folder / OWNER_NAME).write_text(json.dumps({"command": "medseg run"}))
    check_output_owner(folder, "medseg run pipelines/other.yaml")
    with pytest.raises(OutputError, match="holds the output of medseg run"):
        check_output_owner(folder, "medseg evaluate")
