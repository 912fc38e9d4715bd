"""A DICOM series folder with broken geometry is refused, naming the problem (issue 32, part 3):
missing slices (ITK averaged the spacing), no Image Position (ITK used 1 mm), duplicated
positions, and two image series in one folder (one was dropped without a word)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import InputFileError
from medseg.io import Geometry, dicom_series_files, read_volume

from .conftest import assert_refused, run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dicom_helpers import write_series  # noqa: E402

SHAPE = (12, 10, 8)
GEOMETRY = Geometry(SHAPE, (0.7, 0.7, 2.5), (-20.0, 15.0, 40.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def _array(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, SHAPE).astype(np.int16)


def _grid(n_slices: int) -> Geometry:
    return Geometry((*SHAPE[:2], n_slices), GEOMETRY.spacing, GEOMETRY.origin, GEOMETRY.direction)  # type: ignore[arg-type]


def _series(folder: Path, **kwargs) -> list[Path]:
    return write_series(folder, _array(), GEOMETRY, **kwargs)


def _edit(path: Path, **changes) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def _stats_on(tmp_path: Path, folder: Path):
    """``medseg stats`` over a one-row manifest whose CT image is ``folder``: the case fails."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"case_id,patient_id,modality,image_ct,label,split\nc1,p1,CT,{folder},{folder},\n")
    return run_cli("stats", manifest, "--out", tmp_path / "out", "--no-progress")


def test_good_series_reads_with_exact_spacing(tmp_path):
    folder = tmp_path / "ct"
    _series(folder, order="shuffled")
    volume = read_volume(folder)
    assert volume.shape == SHAPE
    assert volume.spacing[2] == pytest.approx(2.5, abs=1e-6)
    np.testing.assert_array_equal(volume.array, _array())


def test_missing_slices_name_the_gap(tmp_path):
    folder = tmp_path / "ct"
    files = _series(folder)
    for path in files[3:6]:  # slices 3, 4, 5 of 8: 3 missing between 2 and 6
        path.unlink()
    with pytest.raises(InputFileError) as info:
        read_volume(folder)
    message = str(info.value)
    assert message.startswith(f"{folder}: DICOM series has missing slices (2.5 mm spacing)"), message
    assert "3 slice(s) missing between [-20.0, 15.0, 45.0] (img0002.dcm) and [-20.0, 15.0, 55.0] (img0006.dcm)" in message


def test_no_image_position_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "ct"
    files = _series(folder)
    _edit(files[4], ImagePositionPatient=None)
    with pytest.raises(InputFileError, match=r"img0004.dcm: DICOM instance has no Image Position \(Patient\)"):
        read_volume(folder)


def test_duplicated_positions_name_the_files(tmp_path):
    folder = tmp_path / "ct"
    files = _series(folder)
    _edit(files[5], ImagePositionPatient=[f"{v:.6f}" for v in (-20.0, 15.0, 40.0 + 2.5 * 4)])  # slice 4's position
    with pytest.raises(InputFileError, match=r"1 duplicated slice position\(s\): img0004.dcm, img0005.dcm are at "):
        read_volume(folder)


def test_uneven_spacing_is_refused(tmp_path):
    folder = tmp_path / "ct"
    files = _series(folder)
    _edit(files[7], ImagePositionPatient=[f"{v:.6f}" for v in (-20.0, 15.0, 40.0 + 2.5 * 6 + 3.4)])
    with pytest.raises(InputFileError, match="unevenly spaced: 3.400 mm between img0006.dcm and img0007.dcm"):
        read_volume(folder)


def test_two_image_series_in_one_folder_are_listed(tmp_path):
    folder = tmp_path / "ct"
    _series(folder)
    second = write_series(tmp_path / "other", _array(1)[:, :, :5], _grid(5), series_uid="1.2.826.0.1.3680043.8.498.9")
    for path in second:
        _edit(path, SeriesNumber=7, SeriesDescription="arterial")
        path.rename(folder / f"b_{path.name}")
    with pytest.raises(InputFileError) as info:
        dicom_series_files(folder)
    message = str(info.value)
    assert "folder holds 2 image series (series 3 '' (CT, 8 instances); series 7 'arterial' (CT, 5 instances))" in message
    assert "medseg import dicom" in message


def test_localiser_and_seg_beside_the_series_stay_ignored(tmp_path):
    folder = tmp_path / "ct"
    _series(folder)
    localiser = write_series(tmp_path / "loc", _array(2)[:, :, :1], _grid(1), series_uid="1.2.826.0.1.3680043.8.498.11")
    localiser[0].rename(folder / "loc.dcm")
    three_plane = write_series(tmp_path / "loc3", _array(3)[:, :, :3], _grid(3), series_uid="1.2.826.0.1.3680043.8.498.12")
    for path in three_plane:
        _edit(path, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
        path.rename(folder / f"loc3_{path.name}")
    assert len(dicom_series_files(folder)) == 8
    assert read_volume(folder).spacing[2] == pytest.approx(2.5, abs=1e-6)


def test_cli_reports_the_gap_as_one_line_per_case(tmp_path):
    folder = tmp_path / "ct"
    for path in _series(folder)[2:4]:
        path.unlink()
    proc = _stats_on(tmp_path, folder)
    assert proc.returncode == 1, proc.stderr
    failures = (tmp_path / "out" / "failures.csv").read_text()
    assert "2 slice(s) missing between" in failures and str(folder) in failures
    assert "Traceback" not in proc.stderr


def test_cli_refuses_two_series_for_export_seg(tmp_path):
    folder = tmp_path / "ct"
    _series(folder)
    for path in write_series(tmp_path / "other", _array(1), GEOMETRY, series_uid="1.2.826.0.1.3680043.8.498.9"):
        path.rename(folder / f"b_{path.name}")
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), np.eye(4)), str(tmp_path / "mask.nii.gz"))
    proc = run_cli("export-seg", tmp_path / "mask.nii.gz", "--reference", folder, "--out", tmp_path / "seg.dcm")
    assert_refused(proc, str(folder), "2 image series", "medseg import dicom")
    assert not (tmp_path / "seg.dcm").exists()


def test_import_dicom_refuses_a_series_with_a_gap_and_keeps_the_good_one(tmp_path):
    """``import dicom`` checks each series' geometry from its headers: a series with missing slices
    is refused (one line naming the gap by file names only), the complete series becomes a row."""
    import csv

    archive = tmp_path / "PATIENT_SECRET_FOLDER"
    _series(archive / "good")
    broken = _series(archive / "gap", series_uid="1.2.826.0.1.3680043.8.498.77")
    for path in broken[3:6]:
        path.unlink()
    manifest = tmp_path / "work" / "m.csv"
    proc = run_cli("import", "dicom", archive, "--out", manifest, env={"MEDSEG_SITE_SECRET": "cd" * 32})
    assert proc.returncode == 1, proc.stderr
    assert "3 slice(s) missing between" in proc.stderr and "(img0002.dcm) and" in proc.stderr
    assert "PATIENT_SECRET_FOLDER" not in proc.stderr
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and read_volume(manifest.parent / rows[0]["image_image"]).shape == SHAPE
    failures = (tmp_path / "work" / "m_failures.csv").read_text()
    assert "missing slices" in failures and "PATIENT_SECRET_FOLDER" not in failures
