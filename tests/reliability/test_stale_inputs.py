"""Stale results (issue 32, item 4): a scan or label replaced in place (same path, new content)
is a new input. `medseg infer` predicts that case again (and only it); `medseg run` reruns the
stages that read it. The identity itself (:mod:`medseg.input_identity`) is checked directly."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.input_identity import HEAD_BYTES, input_identity

from .conftest import case_rows, leftovers, run_cli, write_rows


def _copy_dataset(tmp_path: Path, dataset) -> Path:
    """The dataset's files copied into ``tmp_path/data`` (tests replace them), with a manifest."""
    data = tmp_path / "data"
    data.mkdir()
    rows = case_rows(dataset)
    for row in rows:
        for column in ("image_flair", "image_t1", "label"):
            copy = data / Path(row[column]).name
            shutil.copyfile(row[column], copy)
            row[column] = str(copy)
    return write_rows(tmp_path / "manifest.csv", rows)


def test_identity_sees_header_bytes_size_and_mtime_not_the_tail(tmp_path):
    path = tmp_path / "scan.nii"
    data = bytearray(os.urandom(HEAD_BYTES + 4096))
    path.write_bytes(data)
    first = input_identity(path)
    assert first["size"] == len(data)
    assert first["head_sha256"] == hashlib.sha256(bytes(data[:HEAD_BYTES])).hexdigest()
    stat = path.stat()

    data[100] ^= 0xFF  # same size, same mtime (restored): only the header hash tells
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = input_identity(path)
    assert changed["size"] == first["size"] and changed["mtime_ns"] == first["mtime_ns"]
    assert changed != first

    data[100] ^= 0xFF
    data[HEAD_BYTES + 10] ^= 0xFF  # beyond the head, size and mtime kept: not seen (the documented price)
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert input_identity(path) == first
    assert json.loads(json.dumps(first)) == first  # survives the marker's JSON round trip
    assert "error" in input_identity(tmp_path / "gone.nii")


def test_identity_of_a_series_folder_follows_its_files(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    for i in range(3):
        (folder / f"IM{i}.dcm").write_bytes(bytes([i]) * 1000)
    first = input_identity(folder)
    assert first["files"] == 3
    assert first["head_sha256"] == hashlib.sha256(bytes([0]) * 1000).hexdigest()  # IM0.dcm, first in order
    (folder / "IM3.dcm").write_bytes(b"x")
    assert input_identity(folder) != first
    (folder / "IM3.dcm").unlink()
    (folder / "IM1.dcm").write_bytes(bytes([9]) * 1001)
    assert input_identity(folder) != first


def test_infer_predicts_a_replaced_scan_again_and_only_it(tmp_path, dataset, checkpoint):
    manifest = _copy_dataset(tmp_path, dataset)
    out = tmp_path / "out"
    args = ("infer", "--checkpoint", checkpoint, "--manifest", manifest, "--out", out, "--no-progress")
    assert run_cli(*args).returncode == 0
    before = {c: (out / f"{c}_mask.nii.gz").stat().st_mtime_ns for c in ("phantom_000", "phantom_001", "phantom_002")}

    flair = tmp_path / "data" / "phantom_000_flair.nii.gz"
    image = nib.load(str(flair))  # a new scan on the same grid, at the same path
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::-1].copy(), image.affine, image.header), str(flair))
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "inference.json").read_text())
    assert record["rank0"]["done"] == 1 and record["rank0"]["skipped"] == 2
    assert (out / "phantom_000_mask.nii.gz").stat().st_mtime_ns != before["phantom_000"]
    for case_id in ("phantom_001", "phantom_002"):
        assert (out / f"{case_id}_mask.nii.gz").stat().st_mtime_ns == before[case_id]
    marker = json.loads((out / "phantom_000_complete.json").read_text())
    head = flair.read_bytes()[:HEAD_BYTES]
    assert marker["inputs"]["flair"] == {"size": flair.stat().st_size, "mtime_ns": flair.stat().st_mtime_ns,
                                         "head_sha256": hashlib.sha256(head).hexdigest()}

    proc = run_cli(*args)  # nothing changed since: all complete
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "inference.json").read_text())
    assert record["rank0"]["done"] == 0 and record["rank0"]["skipped"] == 3
    assert not leftovers(out)


def test_run_reruns_the_stages_reading_a_replaced_label(tmp_path, dataset):
    manifest = _copy_dataset(tmp_path, dataset)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"name: stale\nmanifest: {manifest}\nstages:\n  - validate\n  - stats\n  - report\n")
    run_dir = tmp_path / "run"
    args = ("run", pipeline, "--out", run_dir, "--no-progress")
    assert run_cli(*args).returncode == 0, "first run"
    proc = run_cli(*args)
    assert proc.returncode == 0 and proc.stdout.count("up to date") == 3, proc.stdout + proc.stderr
    cases_before = (run_dir / "stats" / "case_stats.csv").read_text()

    label = tmp_path / "data" / "phantom_001_label.nii.gz"
    shutil.copyfile(tmp_path / "data" / "phantom_002_label.nii.gz", label)  # another label, same path
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    for stage in ("validate", "stats", "report"):
        assert f"[{stage}] running" in proc.stdout, proc.stdout
    state = json.loads((run_dir / "state.json").read_text())
    assert state["stats"]["runs"] == 2
    assert (run_dir / "stats" / "case_stats.csv").read_text() != cases_before
