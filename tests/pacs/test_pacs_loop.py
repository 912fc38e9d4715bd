"""The whole PACS loop against a real Orthanc (tests/pacs/conftest.py): CT series uploaded
through Orthanc's REST API -> ``medseg run pipelines/pacs.yaml`` (query, retrieve, import,
infer, store) -> each SEG read back from Orthanc equals the run's NIfTI mask voxel for voxel;
a rerun stores nothing; a run killed after its first case resumes; a PACS down during the
push is a per-case failure and a later run stores the SEG."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import save_tiny_checkpoint
from dicom_helpers import PATIENT_ID, PATIENT_NAME, STUDY_UID, write_series
from infer_helpers import ct_phantom

from medseg.io import Geometry, read_volume

from .conftest import PASSWORD, USER

REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "pipelines" / "pacs.yaml"
UID_ROOT = "1.2.826.0.1.3680043.8.498.77"

pytestmark = pytest.mark.slow


@pytest.fixture
def pacs_env(monkeypatch):
    monkeypatch.setenv("MEDSEG_PACS_USER", USER)
    monkeypatch.setenv("MEDSEG_PACS_PASSWORD", PASSWORD)
    monkeypatch.setenv("MEDSEG_SITE_SECRET", "00112233445566778899aabbccddeeff")


def upload_series(orthanc, tmp_path: Path, n: int, first: int, shape=(34, 30, 10), study_uid: str | None = None) -> list[str]:
    """``n`` synthetic CT series (series UIDs ``UID_ROOT.<first + i>``) uploaded to Orthanc."""
    import pydicom

    rng = np.random.default_rng(first)
    uids = []
    for i in range(first, first + n):
        image, _ = ct_phantom(shape, rng)
        geometry = Geometry(image.shape, (0.8, 0.9, 3.0), (-20.0, 31.5, 12.0 + i), tuple(np.eye(3).ravel()))
        uid = f"{UID_ROOT}.{i}"
        files = write_series(tmp_path / "upload" / str(i), image, geometry, series_uid=uid,
                             frame_of_reference=f"{UID_ROOT}.900{i}")  # fmt: skip
        for path in files if study_uid else []:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = study_uid
            ds.save_as(path)
        orthanc.upload(files)
        uids.append(uid)
    return uids


def run_args(orthanc, checkpoint: Path, out: Path) -> list[str]:
    return ["run", str(PIPELINE), "--set", f"pacs.dicomweb_url={orthanc.dicomweb_url}", "--set",
            f"pipeline.checkpoint={checkpoint}", "--set", "pacs.retries=1", "--set", "pacs.backoff_s=0.1",
            "--set", "pacs.timeout_s=20", "--set", f"pacs.study_uids=[{STUDY_UID}]", "--out", str(out),
            "--no-progress"]  # fmt: skip


def ledger(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "pacs_ledger.csv", dtype=str, keep_default_na=False)


def tiny_ct_checkpoint(tmp_path: Path) -> Path:
    """An untrained tiny CT model whose probabilities lie within 0.4306-0.4321, higher inside the
    body than in air: threshold 0.4312 makes masks with lesion and background, so comparing the
    SEGs with the NIfTI masks says something."""
    return save_tiny_checkpoint(tmp_path / "tiny.pt", ["ct"], modality="CT",
                                inference={"threshold": 0.4312, "min_lesion_mm3": 0.0})  # fmt: skip


def stored_once(orthanc, run: Path, uids: list[str], before: int) -> pd.DataFrame:
    """Check a first run stored one SEG per series of ``uids`` (Orthanc grew by as many, every
    ledger row ``stored``); returns the run's ledger."""
    assert orthanc.instance_count() == before + len(uids)
    table = ledger(run)
    assert sorted(table["series_uid"]) == sorted(uids) and set(table["status"]) == {"stored"}
    return table


def check_segs_in_orthanc(orthanc, runs: list[Path], tmp_path: Path) -> int:
    """Every SEG Orthanc holds equals the NIfTI mask of the run case it was made for, voxel for
    voxel, on the grid of the series it references; returns how many SEGs were compared."""
    import pydicom

    from medseg.dicom.seg_reader import read_dicom_seg

    made = {}  # SEG SOPInstanceUID -> (run, case_id)
    for run in runs:
        for seg in (run / "predictions").glob("*_seg.dcm"):
            made[str(pydicom.dcmread(seg, stop_before_pixels=True).SOPInstanceUID)] = (run, seg.name[: -len("_seg.dcm")])
    compared = 0
    for orthanc_id in orthanc.seg_instances():
        path = tmp_path / f"from_orthanc_{orthanc_id}.dcm"
        path.write_bytes(orthanc.get_bytes(f"/instances/{orthanc_id}/file"))
        header = pydicom.dcmread(path, stop_before_pixels=True)
        run, case_id = made[str(header.SOPInstanceUID)]
        source = run / "pacs_pull" / "dicom_series" / case_id
        first = pydicom.dcmread(next(source.iterdir()), stop_before_pixels=True)
        assert header.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
        mask = np.asarray(read_volume(run / "predictions" / f"{case_id}_mask.nii.gz").array)
        seg, _ = read_dicom_seg(path, read_volume(source).geometry)
        assert 0 < int((mask > 0).sum()) < mask.size, "a mask with lesion and background"
        np.testing.assert_array_equal(seg, mask > 0)
        compared += 1
    return compared


def test_pacs_round_trip_rerun_kill_resume_and_pacs_down(orthanc, pacs_env, tmp_path, monkeypatch, capsys):
    from medseg.cli import main

    checkpoint = tiny_ct_checkpoint(tmp_path)
    first_uids = upload_series(orthanc, tmp_path, 2, first=1)
    before = orthanc.instance_count()

    # 1. the round trip: one SEG per series, equal to the NIfTI mask
    run1 = tmp_path / "run1"
    assert main(run_args(orthanc, checkpoint, run1)) == 0
    stored_once(orthanc, run1, first_uids, before)
    assert check_segs_in_orthanc(orthanc, [run1], tmp_path) == 2
    for path in run1.rglob("*"):  # identifiers only in the DICOM files (the retrieved series, the SEGs)
        if path.is_file() and path.suffix != ".dcm":
            data = path.read_bytes()
            assert PATIENT_ID.encode() not in data and PATIENT_NAME.encode() not in data, path
            assert PASSWORD.encode() not in data, path

    # 2. again, same run folder: nothing stored twice; a new run folder: nothing left to answer
    assert main(run_args(orthanc, checkpoint, run1)) == 0
    assert orthanc.instance_count() == before + 2
    assert main(run_args(orthanc, checkpoint, tmp_path / "run_new")) == 0  # "nothing to answer", nothing stored
    assert "[pacs_pull] nothing to do: pacs: nothing to answer" in capsys.readouterr().out
    assert orthanc.instance_count() == before + 2

    # 3. killed after its first case is predicted, then resumed: every new series answered once
    new_uids = upload_series(orthanc, tmp_path, 3, first=10, shape=(96, 96, 24))
    before = orthanc.instance_count()
    run2 = tmp_path / "run2"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "medseg", *run_args(orthanc, checkpoint, run2)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not list((run2 / "predictions").glob("*_complete.json")):
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before its first case was predicted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(list((run2 / "predictions").glob("*_complete.json"))) < 3
    assert orthanc.instance_count() == before  # killed before the push
    assert main(run_args(orthanc, checkpoint, run2)) == 0
    assert orthanc.instance_count() == before + 3
    assert sorted(ledger(run2)["series_uid"]) == sorted(new_uids)
    assert set(ledger(run2)["status"]) == {"stored"}

    # 4. the PACS goes down between inference and the push: a per-case failure with the status,
    # the SEG and mask stay; with the PACS back, the next run of the folder stores it
    from medseg.pipeline.stages import STAGES, Stage

    [late_uid] = upload_series(orthanc, tmp_path, 1, first=20)
    before = orthanc.instance_count()
    real = STAGES["infer"]

    def infer_then_pacs_down(ctx, opts):
        real.run(ctx, opts)
        orthanc.stop()

    monkeypatch.setitem(STAGES, "infer", Stage(infer_then_pacs_down, real.options, real.output, real.restore, real.remember))
    run3 = tmp_path / "run3"
    assert main(run_args(orthanc, checkpoint, run3)) == 0
    failures = pd.read_csv(run3 / "failures.csv")
    assert failures["stage"].tolist() == ["pacs_push"]
    case_id = failures["case_id"][0]
    assert "cannot connect to" in failures["error"][0] and "after 2 attempt(s)" in failures["error"][0]
    assert (run3 / "predictions" / f"{case_id}_seg.dcm").is_file()
    assert (run3 / "predictions" / f"{case_id}_mask.nii.gz").is_file()
    assert ledger(run3)[["series_uid", "status"]].values.tolist() == [[late_uid, "failed"]]
    monkeypatch.setitem(STAGES, "infer", real)
    orthanc.start()
    assert orthanc.instance_count() == before
    assert main(run_args(orthanc, checkpoint, run3)) == 0
    assert orthanc.instance_count() == before + 1
    assert ledger(run3)[["series_uid", "status"]].values.tolist() == [[late_uid, "stored"]]
    assert pd.read_csv(run3 / "failures.csv").empty
    assert check_segs_in_orthanc(orthanc, [run1, run2, run3], tmp_path) == 6
    state = json.loads((run3 / "state.json").read_text())
    assert state["pacs_push"]["status"] == "done"


def test_pacs_command_query_pull_push(orthanc, pacs_env, tmp_path, capsys):
    """`medseg pacs query|pull|push` over the same archive (the study UID filter keeps this
    test's series apart from the loop's)."""
    from medseg.cli import main

    study = f"{UID_ROOT}.5"
    uids = upload_series(orthanc, tmp_path, 1, first=30, study_uid=study)
    common = ["--set", f"pacs.dicomweb_url={orthanc.dicomweb_url}", "--set", f"pacs.study_uids=[{study}]"]
    assert main(["pacs", "query", *common]) == 0
    out = capsys.readouterr().out
    assert uids[0] in out and "1 series on DICOMweb" in out and PATIENT_ID not in out
    assert main(["pacs", "pull", "--out", str(tmp_path / "pulled"), *common]) == 0
    manifest = pd.read_csv(tmp_path / "pulled" / "manifest.csv")
    assert len(manifest) == 1 and manifest["modality"].tolist() == ["CT"]
    assert (tmp_path / "pulled" / "pacs_in" / study / uids[0]).is_dir()
    (tmp_path / "preds").mkdir()
    assert main(["pacs", "push", str(tmp_path / "preds"), *common]) == 0
    assert "0 SEG(s) stored" in capsys.readouterr().out
    assert main(["pacs", "query", "--set", "pacs.dicomweb_url=http://127.0.0.1:9/dicom-web", "--set", "pacs.retries=0"]) == 2
    assert "cannot connect to http://127.0.0.1:9/dicom-web" in capsys.readouterr().err
