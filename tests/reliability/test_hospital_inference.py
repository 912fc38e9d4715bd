"""The hospital user's inference path without hand edits (issue 31): a one-channel model takes a
manifest whose image column has another name; every case is checked before any inference
(modality of DICOM series, single DICOM files, Frame of Reference for SEG) and refused with the
fix; a case whose SEG cannot be written keeps its NIfTI outputs; ``cases.csv``; one line per
case in a log, a slice bar on a terminal, no library INFO lines on the console; a file that is
not a checkpoint is one line without advice to turn safe loading off."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medseg.io import read_volume

from .conftest import ENV, assert_refused, assert_some_failed, leftovers, read_failures, run_cli

pytest.importorskip("highdicom")
if str(Path(__file__).parents[1] / "inference") not in sys.path:  # infer_helpers, also when run alone
    sys.path.insert(0, str(Path(__file__).parents[1] / "inference"))

SHAPE = (34, 30, 10)


def _dicom_series(folder: Path, modality: str = "CT", frame_of_reference: bool = True, uid_tail: str = "2") -> Path:
    """A small oblique series (body box with two bright lesions) written with pydicom."""
    import pydicom
    from dicom_helpers import ct_phantom_series, write_series

    image, _, geometry = ct_phantom_series(SHAPE, np.random.default_rng(3))
    paths = write_series(folder, image, geometry, modality=modality, order="shuffled",
                         series_uid=f"1.2.826.0.1.3680043.8.498.{uid_tail}")
    if not frame_of_reference:
        for path in paths:
            ds = pydicom.dcmread(path)
            del ds.FrameOfReferenceUID
            ds.save_as(path, enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def ct_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ct") / "ct.pt", ["ct"], modality="CT",
                                inference={"min_lesion_mm3": 0.0, "threads": 1})


def _manifest(path: Path, rows: list[tuple[str, str, Path]], column: str = "image_image") -> Path:
    frame = pd.DataFrame([{"case_id": c, "patient_id": f"p_{c}", "modality": m, column: str(p), "label": "", "split": ""}
                          for c, m, p in rows])
    frame.to_csv(path, index=False)
    return path


def test_one_channel_model_takes_any_image_column_and_seg_refusals_come_first(tmp_path, ct_checkpoint):
    good = _dicom_series(tmp_path / "dicom" / "a")
    no_for = _dicom_series(tmp_path / "dicom" / "b", frame_of_reference=False, uid_tail="7")
    manifest = _manifest(tmp_path / "manifest.csv", [("good", "CT", good), ("nofor", "CT", no_for)])
    out = tmp_path / "out"
    proc = run_cli("infer", "--checkpoint", ct_checkpoint, "--manifest", manifest, "--out", out,
                   "--output-format", "both")
    assert_some_failed(proc)
    assert "column image_image is the model's one channel 'ct'" in proc.stderr
    # refused before any inference: the preflight line comes before the first case's line
    assert proc.stderr.index("refused before inference") < proc.stderr.index("case good done")
    error = read_failures(out)["nofor"]
    assert "no Frame of Reference UID" in error and "missing_frame_of_reference=new" in error and str(no_for) in error
    assert not list(out.glob("nofor*")) and leftovers(out) == []
    assert (out / "good_seg.dcm").is_file() and (out / "good_mask.nii.gz").is_file()
    cases = pd.read_csv(out / "cases.csv")
    assert cases["case_id"].tolist() == ["good"] and cases["dicom_seg"].tolist() == ["written"]

    # the fix the message names: the SEG gets a new frame of reference, said in the SEG and cases.csv
    proc = run_cli("infer", "--checkpoint", ct_checkpoint, "--manifest", manifest, "--out", out,
                   "--output-format", "both", "--set", "inference.dicom_seg.missing_frame_of_reference=new")
    assert proc.returncode == 0, proc.stderr
    import pydicom

    seg = pydicom.dcmread(out / "nofor_seg.dcm")
    assert "new frame of ref" in seg.SeriesDescription and seg.FrameOfReferenceUID
    cases = pd.read_csv(out / "cases.csv").set_index("case_id")
    assert cases.loc["nofor", "dicom_seg"] == "written (new frame of reference)"
    assert read_failures(out) == {}


def test_cases_table_numbers_match_the_written_mask(tmp_path, ct_checkpoint):
    folder = _dicom_series(tmp_path / "series")
    out = tmp_path / "out"
    proc = run_cli("infer", "--checkpoint", ct_checkpoint, "--input", "case=c1", f"ct={folder}", "--out", out)
    assert proc.returncode == 0, proc.stderr
    row = pd.read_csv(out / "cases.csv").iloc[0]
    mask = read_volume(out / "c1_mask.nii.gz")
    voxel_ml = float(np.prod(mask.spacing)) / 1000
    lesions = pd.read_csv(out / "c1_lesions.csv")
    assert row["n_lesions"] == len(lesions)
    assert row["total_volume_ml"] == pytest.approx(mask.array.astype(bool).sum() * voxel_ml, rel=1e-3, abs=1e-4)
    largest = lesions["volume_ml"].max() if len(lesions) else 0.0
    assert row["largest_volume_ml"] == pytest.approx(largest, rel=1e-3, abs=1e-4)
    assert 0 <= row["slices_with_lesion"] <= SHAPE[2] and row["dicom_seg"] == "not asked"
    record = json.loads((out / "inference.json").read_text())
    assert record["model"]["checkpoints"][0]["sha256"] and record["model"]["model_folder"] is None


def test_input_paths_get_the_manifest_checks(tmp_path, ct_checkpoint):
    mr = _dicom_series(tmp_path / "mr_series", modality="MR", uid_tail="8")
    ct = _dicom_series(tmp_path / "ct_series", uid_tail="9")
    single = next(ct.glob("*.dcm"))
    out = tmp_path / "out"
    proc = run_cli("infer", "--checkpoint", ct_checkpoint, "--input", mr, single, ct, "--out", out)
    assert_some_failed(proc)
    failures = read_failures(out)
    assert "is MR, but the model was trained on CT" in failures["mr_series"]
    single_id = single.name
    assert "single DICOM file (one slice)" in failures[single_id] and "folder holding the whole series" in failures[single_id]
    assert (out / "ct_series_mask.nii.gz").is_file() and not list(out.glob("mr_series_*"))


def test_a_seg_that_cannot_be_written_keeps_the_nifti_outputs(tmp_path, monkeypatch, rng):
    """In process: the SEG writer fails after the mask exists (e.g. the disk); the mask, the
    lesion table and the marker stay, failures.csv names the case, a rerun computes it again."""
    from infer_helpers import identity_bundle

    from medseg.config import InferenceConfig
    from medseg.dicom import seg_writer
    from medseg.errors import OutputError
    from medseg.inference.cases import InferenceCase
    from medseg.inference.runner import run_inference

    folder = _dicom_series(tmp_path / "series")

    def refuse(*args, **kwargs):
        raise OutputError(Path(args[3]), "cannot write DICOM SEG (No space left on device)")

    monkeypatch.setattr(seg_writer, "write_dicom_seg", refuse)
    for output_format in ("both", "dicom-seg"):
        out = tmp_path / output_format
        bundle = identity_bundle(inference=InferenceConfig(min_lesion_mm3=0.0, output_format=output_format))
        summary = run_inference([InferenceCase("c1", {"ct": folder})], bundle, out, show_progress=False)
        assert [c for c, _ in summary.failures] == ["c1"] and "its NIfTI mask and lesion table are kept" in summary.failures[0][1]
        assert (out / "c1_mask.nii.gz").is_file() and (out / "c1_lesions.csv").is_file() and not (out / "c1_seg.dcm").exists()
        assert pd.read_csv(out / "cases.csv")["dicom_seg"].iloc[0].startswith("failed: ")
        again = run_inference([InferenceCase("c1", {"ct": folder})], bundle, out, show_progress=False)
        assert again.skipped == []  # incomplete without its SEG: computed again


def test_non_checkpoint_file_is_one_line(tmp_path):
    import torch

    text = tmp_path / "notes.pt"
    text.write_text("not a model")
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": Path("x")}, pickled)  # a Python object: refused by safe loading
    series = _dicom_series(tmp_path / "series")
    for path, fragment in ((text, "not a checkpoint"), (pickled, "medseg never unpickles")):
        proc = run_cli("infer", "--checkpoint", path, "--input", series, "--out", tmp_path / f"out_{path.stem}")
        line = assert_refused(proc, str(path), fragment)
        assert "weights_only" not in proc.stderr, line


def test_console_shows_a_line_per_case_and_no_library_info(tmp_path, ct_checkpoint):
    folders = [_dicom_series(tmp_path / f"s{i}", uid_tail=f"2{i}") for i in range(2)]
    out = tmp_path / "out"
    proc = run_cli("infer", "--checkpoint", ct_checkpoint, "--input", *folders, "--out", out, "--output-format", "both")
    assert proc.returncode == 0, proc.stderr
    assert "INFO highdicom" not in proc.stderr  # highdicom's per-frame INFO lines stay out of the console
    assert proc.stderr.count("case s0 done") == 1 and proc.stderr.count("case s1 done") == 1
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr and "slice/s" not in proc.stderr  # no bar frames
    log = (out / "run.log").read_text()
    assert "highdicom" in log and "case s1 done" in log


def test_terminal_shows_progress_inside_a_case(tmp_path, ct_checkpoint):
    folder = _dicom_series(tmp_path / "series")
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen([sys.executable, "-m", "medseg.cli", "infer", "--checkpoint", str(ct_checkpoint),
                             "--input", str(folder), "--out", str(tmp_path / "out")],
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=ENV)
    os.close(follower)
    screen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    assert proc.wait(timeout=120) == 0, screen.decode(errors="replace")
    text = screen.decode(errors="replace")
    assert "series:" in text and "/10 [" in text and "slice/s" in text  # the slice bar of the 10-slice case
    assert "case series done" in text
