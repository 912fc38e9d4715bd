"""The hospital round trip with no hand edits (issue 31, README "From DICOM to DICOM SEG"): a CT
model folder applied to a DICOM archive whose one folder holds two CT series (one without a
Frame of Reference UID) beside an MR series: ``import dicom --model`` -> ``medseg run
pipelines/infer_report.yaml`` / ``medseg infer --model`` -> SEG files, ``cases.csv`` and a
cohort report whose configuration is what inference ran with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from .conftest import read_failures, run_cli

pytest.importorskip("highdicom")
if str(Path(__file__).parents[1] / "inference") not in sys.path:  # infer_helpers, also when run alone
    sys.path.insert(0, str(Path(__file__).parents[1] / "inference"))

REPO = Path(__file__).resolve().parents[2]


def _archive(root: Path) -> Path:
    """One folder with two CT series (the second without Frame of Reference UID), an MR series
    in another folder; one patient."""
    import numpy as np
    import pydicom
    from dicom_helpers import ct_phantom_series, write_series

    image, _, geometry = ct_phantom_series((34, 30, 10), np.random.default_rng(5))
    study = root / "DOE_JANE_SECRET-123" / "CT"
    write_series(study, image, geometry, series_uid="1.2.826.0.1.3680043.8.498.21")
    for path in write_series(study / "tmp", image, geometry, series_uid="1.2.826.0.1.3680043.8.498.22"):
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.SeriesNumber = 4
        ds.save_as(study / f"b_{path.name}", enforce_file_format=True)  # the same folder as the first series
        path.unlink()
    (study / "tmp").rmdir()
    write_series(root / "DOE_JANE_SECRET-123" / "MR", image, geometry, modality="MR",
                 series_uid="1.2.826.0.1.3680043.8.498.23")
    return root


def _model_folder(tmp: Path) -> Path:
    """A one-fold CT model folder whose rule differs from the defaults (min lesion 90 mm^3)."""
    from conftest import save_tiny_checkpoint

    from medseg.auto.model_folder import write_model_folder

    checkpoint = save_tiny_checkpoint(tmp / "fold_0_last.pt", ["ct"], modality="CT", inference={"threads": 1})
    (tmp / "config.yaml").write_text("{}\n")
    (tmp / "folds.json").write_text(json.dumps({"n_folds": 1}))
    folder = tmp / "model"
    write_model_folder(folder, [checkpoint], tmp / "config.yaml", tmp / "folds.json", {"min_lesion_mm3": 90.0})
    return folder


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(archive, model folder, manifest written by import dicom --model)."""
    tmp = tmp_path_factory.mktemp("hospital")
    archive, model = _archive(tmp / "archive"), _model_folder(tmp)
    manifest = tmp / "work" / "manifest.csv"
    proc = run_cli("import", "dicom", archive, "--model", model, "--out", manifest,
                   env={"MEDSEG_SITE_SECRET": "ab" * 32})  # a module fixture: the test's secret file is not set yet
    assert proc.returncode == 0, proc.stderr
    assert "modality MR, the model takes CT" in proc.stderr
    return archive, model, manifest


def test_import_names_the_channel_after_the_model_and_keeps_the_two_series_apart(hospital):
    _, _, manifest = hospital
    frame = pd.read_csv(manifest)
    assert [c for c in frame.columns if c.startswith("image_")] == ["image_ct"]
    assert len(frame) == 2 and set(frame["modality"]) == {"CT"}
    assert "SECRET-123" not in manifest.read_text() and "DOE_JANE" not in manifest.read_text()


def test_infer_report_pipeline_round_trip(hospital, tmp_path):
    _, model, manifest = hospital
    run = tmp_path / "run"
    args = ["run", REPO / "pipelines" / "infer_report.yaml", "--set", f"pipeline.model={model}",
            "--set", f"pipeline.manifest={manifest}", "--set", "stage.infer.output_format=both", "--out", run]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    cases = pd.read_csv(manifest)["case_id"].tolist()
    predictions = run / "predictions"
    segs = sorted(p.name for p in predictions.glob("*_seg.dcm"))
    assert len(segs) == 1  # the series without Frame of Reference was refused before inference
    refused = next(c for c in cases if f"{c}_seg.dcm" not in segs)
    failures = pd.read_csv(run / "failures.csv")
    assert failures["case_id"].tolist() == [refused] and failures["stage"].tolist() == ["infer"]
    assert "missing_frame_of_reference=new" in failures["error"][0]
    # the record shows what ran: the model folder's rule, not the default config
    ran = json.loads((predictions / "inference.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert ran["inference"]["min_lesion_mm3"] == 90.0 and config["inference"] == ran["inference"]
    assert config["model"]["arch"] == "unet" and ran["model"]["model_folder"] == str(model)
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["model_identity"]["model_folder"] == str(model)
    report = (run / "report" / "report.html").read_text()
    assert "<h2>Predicted cases</h2>" in report and 'alt="Predicted lesions: area per slice' in report
    assert "reference" not in report.split("<h2>Lesion-distribution curves</h2>")[1].split("</section>")[0]
    assert "<details" in report
    cohort = pd.read_csv(predictions / "cases.csv")
    assert cohort["case_id"].tolist() == [c for c in cases if c != refused]

    # the fix the line names, through the same command: both SEGs, nothing redone for the first
    proc = run_cli(*args, "--set", "inference.dicom_seg.missing_frame_of_reference=new")
    assert proc.returncode == 0, proc.stderr
    assert len(list(predictions.glob("*_seg.dcm"))) == 2
    assert pd.read_csv(run / "failures.csv").empty
    cohort = pd.read_csv(predictions / "cases.csv").set_index("case_id")
    assert cohort.loc[refused, "dicom_seg"] == "written (new frame of reference)"
    for path in run.rglob("*"):
        if path.is_file() and path.suffix != ".dcm":
            assert b"SECRET-123" not in path.read_bytes(), path


def test_infer_command_round_trip(hospital, tmp_path):
    _, model, manifest = hospital
    out = tmp_path / "preds"
    proc = run_cli("infer", "--model", model, "--manifest", manifest, "--out", out, "--output-format", "both",
                   "--set", "inference.dicom_seg.missing_frame_of_reference=new")
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*_seg.dcm"))) == 2 and len(list(out.glob("*_mask.nii.gz"))) == 2
    assert read_failures(out) == {}
    cohort = pd.read_csv(out / "cases.csv")
    assert list(cohort.columns) == ["case_id", "n_lesions", "total_volume_ml", "largest_volume_ml",
                                    "slices_with_lesion", "qc_score", "qc_flag", "dicom_seg"]
    assert cohort["qc_score"].notna().all() and cohort["qc_flag"].isna().all()  # no qc.json in this folder: no flags
    record = json.loads((out / "inference.json").read_text())
    assert record["inference"]["min_lesion_mm3"] == 90.0 and record["model"]["checkpoints"][0]["sha256"]
