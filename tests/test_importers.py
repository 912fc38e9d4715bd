from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import make_affine, write_nifti
from test_io import write_dicom_series

from medseg.errors import MedsegError
from medseg.importers import import_brats, import_dicom, import_files, import_nnunet
from medseg.io import Geometry
from medseg.manifest import read_manifest, write_manifest


def _vol(path, value=1):
    return write_nifti(path, np.full((4, 4, 3), value, dtype=np.int16), np.eye(4))


def test_brats_layout(tmp_path):
    for case in ("Brats_A_1", "Brats_B_1"):
        d = tmp_path / case
        d.mkdir()
        for ch in ("flair", "t1ce", "t2", "seg"):
            _vol(d / f"{case}_{ch}.nii.gz")
    # a validation case without segmentation, BraTS-2023 style names
    d = tmp_path / "BraTS-GLI-00001-000"
    d.mkdir()
    for ch in ("flair", "t1ce", "t2"):
        _vol(d / f"BraTS-GLI-00001-000-{ch}.nii.gz")
    cases = import_brats(tmp_path)
    assert [c.case_id for c in cases] == ["BraTS-GLI-00001-000", "Brats_A_1", "Brats_B_1"]
    assert cases[1].channels == ["flair", "t1ce", "t2"] and cases[1].label.name == "Brats_A_1_seg.nii.gz"
    assert cases[0].label is None
    back = read_manifest(write_manifest(cases, tmp_path / "m.csv"))
    assert len(back) == 3


def test_brats_inconsistent_channels(tmp_path):
    _vol(tmp_path / "a_flair.nii.gz"), _vol(tmp_path / "a_seg.nii.gz"), _vol(tmp_path / "b_t1.nii.gz")
    with pytest.raises(MedsegError, match="different channel sets"):
        import_brats(tmp_path)


def test_nnunet_v2_layout(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    (tmp_path / "imagesTs").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT", "1": "CT late"}, "labels": {"background": 0, "tumor": 1}, "numTraining": 2,
         "file_ending": ".nii.gz"}))
    for cid in ("liver_001", "liver_002"):
        _vol(tmp_path / "imagesTr" / f"{cid}_0000.nii.gz"), _vol(tmp_path / "imagesTr" / f"{cid}_0001.nii.gz")
        _vol(tmp_path / "labelsTr" / f"{cid}.nii.gz")
    _vol(tmp_path / "imagesTs" / "liver_100_0000.nii.gz"), _vol(tmp_path / "imagesTs" / "liver_100_0001.nii.gz")
    cases = import_nnunet(tmp_path)
    assert [c.case_id for c in cases] == ["liver_001", "liver_002", "liver_100"]
    assert cases[0].modality == "CT" and cases[0].channels == ["ct", "ct_late"]
    assert cases[2].label is None
    (tmp_path / "imagesTr" / "liver_002_0001.nii.gz").unlink()
    with pytest.raises(MedsegError, match=r"channel 1 \(ct_late\) of case liver_002 is missing"):
        import_nnunet(tmp_path)


def test_msd_multimodal_4d_gets_clear_error(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"modality": {"0": "FLAIR", "1": "T1w"}, "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}))
    with pytest.raises(MedsegError, match="nnUNetv2_convert_MSD_dataset"):
        import_nnunet(tmp_path)


def test_files_by_glob(tmp_path):
    for cid in ("p1", "p2", "p3"):
        _vol(tmp_path / f"{cid}_ct.nii.gz")
    _vol(tmp_path / "p1_mask.nii.gz"), _vol(tmp_path / "p2_mask.nii.gz")
    cases = import_files(str(tmp_path / "*_ct.nii.gz"), str(tmp_path / "*_mask.nii.gz"), modality="CT", channel="ct")
    assert {c.case_id: (c.label.name if c.label else None) for c in cases} == {
        "p1": "p1_mask.nii.gz", "p2": "p2_mask.nii.gz", "p3": None}
    _vol(tmp_path / "p9_mask.nii.gz")
    with pytest.raises(MedsegError, match="p9_mask.nii.gz: label has no matching image"):
        import_files(str(tmp_path / "*_ct.nii.gz"), str(tmp_path / "*_mask.nii.gz"), modality="CT")


def _set_series_uid(folder, series_uid: str) -> None:
    """Give the series in ``folder`` its own SeriesInstanceUID (test_io writes one UID for all)."""
    import pydicom

    for n, path in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{series_uid}.{n + 1}"
        ds.save_as(path)


def test_dicom_folders_pseudonymise_patient(tmp_path):
    arr = np.zeros((8, 8, 4), dtype=np.int16)
    image = sitk.GetImageFromArray(arr.transpose(2, 1, 0).copy())
    Geometry.from_affine(make_affine("lps", spacing=(1, 1, 2)), arr.shape).apply_to(image)
    archive = tmp_path / "archive"
    for n, name in enumerate(("study1", "study2")):
        (archive / name).mkdir(parents=True)
        write_dicom_series(image, archive / name, modality="MR", patient_id="SECRET-123")
        _set_series_uid(archive / name, f"1.2.826.0.1.3680043.2.1125.9.{n + 1}")
    (archive / "Doe^John_1970").mkdir()  # a folder named after the patient never becomes a case id
    write_dicom_series(image, archive / "Doe^John_1970", modality="MR", patient_id="OTHER-9")
    _set_series_uid(archive / "Doe^John_1970", "1.2.826.0.1.3680043.2.1125.9.3")
    result = import_dicom(archive, map_file=tmp_path / "map.csv", series_dir=tmp_path / "dicom_series")
    cases = result.cases
    assert not result.refusals
    pid = cases[0].patient_id
    assert [c.case_id for c in cases] == [f"{pid}_s1", f"{pid}_s2", f"{cases[2].patient_id}_s1"]
    assert cases[0].patient_id == cases[1].patient_id != cases[2].patient_id and "SECRET" not in pid
    assert cases[0].modality == "MR"
    assert [c.images["image"] for c in cases] == [(tmp_path / "dicom_series" / c.case_id).resolve() for c in cases]
    written = pd.read_csv(write_manifest(cases, tmp_path / "m.csv"), dtype=str)
    ids = " ".join(written["case_id"]) + " ".join(written["patient_id"])  # what outputs and reports carry
    assert "SECRET" not in ids and "OTHER" not in ids and "Doe" not in ids and "1970" not in ids
    assert "Doe" not in " ".join(written["image_image"])  # the rows point at the series folders of links
    mapping = pd.read_csv(tmp_path / "map.csv")
    assert mapping["folder"].tolist() == ["study1", "study2", "Doe^John_1970"]
    assert mapping["case_id"].tolist() == [c.case_id for c in cases]
    assert mapping["series_uid"].tolist() == [f"1.2.826.0.1.3680043.2.1125.9.{n}" for n in (1, 2, 3)]
