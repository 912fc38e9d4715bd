"""`inference.output_format` dicom-seg / both: the SEG of a DICOM series case equals its NIfTI
mask voxel for voxel; a case that is not a DICOM series fails clearly, the others go on."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from dicom_helpers import PATIENT_ID, PATIENT_NAME, ct_phantom_series, write_series
from infer_helpers import ct_phantom, identity_bundle

from medseg.config import InferenceConfig
from medseg.dicom.seg_reader import read_dicom_seg
from medseg.inference.cases import InferenceCase
from medseg.inference.runner import run_inference
from medseg.io import read_volume

pytest.importorskip("highdicom")


def dicom_phantom(tmp_path, rng, kind="oblique", name="series"):
    image, lesion, geometry = ct_phantom_series((34, 30, 10), rng, kind)
    folder = tmp_path / name
    write_series(folder, image, geometry, order="shuffled")
    return folder, lesion


@pytest.mark.parametrize("kind", ["axial", "oblique"])
def test_seg_equals_the_nifti_mask(tmp_path, rng, kind):
    folder, lesion = dicom_phantom(tmp_path, rng, kind)
    bundle = identity_bundle(inference=InferenceConfig(min_lesion_mm3=0.0, output_format="both", write_prob=True))
    out = tmp_path / "out"
    summary = run_inference([InferenceCase("P1_s1", {"ct": folder})], bundle, out, show_progress=False)
    assert not summary.failures
    source = read_volume(folder)
    nifti = np.asarray(nib.load(str(out / "P1_s1_mask.nii.gz")).dataobj)
    np.testing.assert_array_equal(nifti, lesion)  # the identity model reproduces the lesions
    seg, _ = read_dicom_seg(out / "P1_s1_seg.dcm", source.geometry)
    np.testing.assert_array_equal(seg, nifti)
    marker = json.loads((out / "P1_s1_complete.json").read_text())
    assert "P1_s1_seg.dcm" in marker["files"]
    # the SEG carries the patient (it goes back to the archive); nothing else written does
    import pydicom

    assert pydicom.dcmread(out / "P1_s1_seg.dcm").PatientID == PATIENT_ID
    for path in out.iterdir():
        if path.suffix != ".dcm":
            data = path.read_bytes()
            assert PATIENT_ID.encode() not in data and PATIENT_NAME.encode() not in data


def test_dicom_seg_alone_and_non_dicom_cases_fail_clearly(tmp_path, rng):
    folder, lesion = dicom_phantom(tmp_path, rng)
    nifti_case = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(lesion.astype(np.int16) * 200, np.eye(4)), str(nifti_case))
    bundle = identity_bundle(inference=InferenceConfig(min_lesion_mm3=0.0, output_format="dicom-seg"))
    out = tmp_path / "out"
    cases = [InferenceCase("dicom", {"ct": folder}), InferenceCase("nifti", {"ct": nifti_case})]
    summary = run_inference(cases, bundle, out, show_progress=False)
    assert summary.done == ["dicom"]
    failures = pd.read_csv(out / "failures.csv")
    assert failures["case_id"].tolist() == ["nifti"]
    assert "needs a DICOM series" in failures["error"][0] and "scan.nii.gz" in failures["error"][0]
    assert (out / "dicom_seg.dcm").is_file() and not (out / "dicom_mask.nii.gz").exists()
    assert not list(out.glob("nifti*"))
    # a re-run finds the SEG case complete
    again = run_inference(cases[:1], bundle, out, show_progress=False)
    assert again.skipped == ["dicom"]


@pytest.mark.slow
def test_infer_report_pipeline_writes_segs_and_records_non_dicom_rows(tmp_path, rng):
    """`medseg run pipelines/infer_report.yaml` over a manifest with DICOM and NIfTI rows."""
    from conftest import REPO, save_tiny_checkpoint

    from medseg.cli import main
    from medseg.manifest import Case, write_manifest

    cases = []
    for n in range(2):
        folder, _ = dicom_phantom(tmp_path, rng, name=f"series{n}")
        cases.append(Case(f"P{n}_s1", f"P{n}", "CT", {"ct": folder}, None, ""))
    image, _ = ct_phantom((34, 30, 10), rng)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(tmp_path / "scan.nii.gz"))
    cases.append(Case("nifti_case", "P9", "CT", {"ct": tmp_path / "scan.nii.gz"}, None, ""))
    manifest = write_manifest(cases, tmp_path / "manifest.csv")
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pt", ["ct"], modality="CT")
    run = tmp_path / "run"
    code = main(["run", str(REPO / "pipelines" / "infer_report.yaml"), "--set", f"pipeline.checkpoint={checkpoint}",
                 "--set", f"pipeline.manifest={manifest}", "--set", "inference.output_format=both",
                 "--out", str(run), "--no-progress"])  # fmt: skip
    assert code == 0  # the run completes; the failed case is recorded
    predictions = run / "predictions"
    assert sorted(p.name for p in predictions.glob("*_seg.dcm")) == ["P0_s1_seg.dcm", "P1_s1_seg.dcm"]
    failures = pd.read_csv(predictions / "failures.csv")
    assert failures["case_id"].tolist() == ["nifti_case"]
    assert "needs a DICOM series" in failures["error"][0]
    run_failures = pd.read_csv(run / "failures.csv")
    assert run_failures["case_id"].tolist() == ["nifti_case"] and run_failures["stage"].tolist() == ["infer"]
    assert (run / "report" / "report.html").is_file()
    for path in run.rglob("*"):
        if path.is_file() and path.suffix != ".dcm":
            assert PATIENT_ID.encode() not in path.read_bytes(), path


def test_nested_seg_settings_from_set():
    from medseg.errors import ConfigError
    from medseg.inference.runner import apply_inference_overrides

    cfg = apply_inference_overrides(InferenceConfig(), ["inference.output_format=both", "inference.dicom_seg.fractional=true",
                                                        "inference.dicom_seg.category.meaning=Tumour"])  # fmt: skip
    assert cfg.output_format == "both" and cfg.dicom_seg.fractional and cfg.dicom_seg.category.meaning == "Tumour"
    assert cfg.dicom_seg.category.value == "49755003"  # the rest of the section is kept
    with pytest.raises(ConfigError, match="colour"):
        apply_inference_overrides(InferenceConfig(), ["inference.dicom_seg.colour=red"])
    with pytest.raises(ConfigError, match="output_format"):
        apply_inference_overrides(InferenceConfig(), ["inference.output_format=dicom"])


def test_infer_cli_output_format(tmp_path, rng, capsys):
    from conftest import save_tiny_checkpoint

    from medseg.cli import main

    folder, _ = dicom_phantom(tmp_path, rng)
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pt", ["ct"], modality="CT")
    out = tmp_path / "out"
    assert main(["infer", "--checkpoint", str(checkpoint), "--input", "case=P1_s1", f"ct={folder}",
                 "--out", str(out), "--output-format", "dicom-seg", "--no-progress"]) == 0  # fmt: skip
    assert (out / "P1_s1_seg.dcm").is_file() and not (out / "P1_s1_mask.nii.gz").exists()
    record = json.loads((out / "inference.json").read_text())
    assert record["inference"]["output_format"] == "dicom-seg"
    import pydicom

    seg = pydicom.dcmread(out / "P1_s1_seg.dcm")
    from medseg.atomic import sha256_file

    assert sha256_file(checkpoint) in seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
