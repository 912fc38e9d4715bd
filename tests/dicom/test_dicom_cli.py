"""`medseg import dicom --labels seg|rtstruct` and `medseg export-seg` through the CLI."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from dicom_helpers import GEOMETRIES, PATIENT_ID, PATIENT_NAME, write_rtstruct, write_series

from medseg.cli import main
from medseg.dicom.seg_reader import read_dicom_seg
from medseg.dicom.seg_writer import write_dicom_seg
from medseg.io import Geometry, read_volume
from medseg.manifest import read_manifest

pytest.importorskip("highdicom")

SHAPE = (22, 18, 7)


def study(root, name: str, kind: str, rng, series_uid: str):
    geometry = Geometry(SHAPE, (0.8, 0.7, 2.0), (5.0, -3.0, 10.0), tuple(GEOMETRIES[kind].ravel()))
    folder = root / name / "CT"
    write_series(folder, (rng.random(SHAPE) * 500).astype(np.int16), geometry, order="shuffled", series_uid=series_uid)
    return folder, read_volume(folder).geometry


def test_import_dicom_with_seg_labels(tmp_path, rng, capsys):
    root = tmp_path / "archive"
    masks = {}
    for n, kind in enumerate(["axial", "oblique"]):
        folder, geometry = study(root, f"patient{n}", kind, rng, series_uid=f"1.2.826.0.1.3680043.8.498.{20 + n}")
        mask = np.zeros(SHAPE, np.uint8)
        mask[3 + n:9, 4:10, 1:4] = 1
        (root / f"patient{n}" / "SEG").mkdir()
        write_dicom_seg(mask, geometry, folder, root / f"patient{n}" / "SEG" / "seg.dcm")
        masks[folder.resolve()] = mask
    study(root, "unlabelled", "axial", rng, series_uid="1.2.826.0.1.3680043.8.498.30")
    out = tmp_path / "import" / "manifest.csv"
    assert main(["import", "dicom", str(root), "--labels", "seg", "--out", str(out), "--val-fraction", "0"]) == 0
    cases = read_manifest(out)
    labelled = [c for c in cases if c.label is not None]
    assert len(cases) == 3 and len(labelled) == 2 and all(c.split == "train" for c in labelled)
    for case in labelled:
        label = read_volume(case.label)
        image = read_volume(case.images["image"])
        assert label.shape == image.shape
        np.testing.assert_allclose(label.affine, image.affine, atol=1e-5)
        # the row's image is a folder of links to exactly its series (import dicom: dicom_series/<case_id>)
        assert case.images["image"].parent == (tmp_path / "import" / "dicom_series").resolve()
        (source,) = {link.resolve().parent for link in case.images["image"].iterdir()}
        np.testing.assert_array_equal(label.array, masks[source])
    text = out.read_text() + capsys.readouterr().out
    assert PATIENT_ID not in text and "Doe" not in text


def test_import_dicom_with_rtstruct_labels(tmp_path, rng):
    root = tmp_path / "archive"
    folder, geometry = study(root, "p", "oblique", rng, series_uid="1.2.826.0.1.3680043.8.498.2")
    matrix = np.asarray(geometry.direction).reshape(3, 3) * np.asarray(geometry.spacing)
    corners = np.array([[3.5, 2.5, 3], [12.5, 2.5, 3], [12.5, 9.5, 3], [3.5, 9.5, 3]])
    points = np.asarray(geometry.origin) + corners @ matrix.T
    write_rtstruct(root / "p" / "RTSTRUCT" / "rs.dcm", folder, {"GTV": [points], "BODY": []})
    out = tmp_path / "m.csv"
    assert main(["import", "dicom", str(root), "--labels", "rtstruct", "--select", "^gtv$", "--out", str(out),
                 "--val-fraction", "0"]) == 0  # fmt: skip
    (case,) = read_manifest(out)
    expected = np.zeros(SHAPE, np.uint8)
    expected[4:13, 3:10, 3] = 1
    np.testing.assert_array_equal(read_volume(case.label).array, expected)
    assert case.label.parent == tmp_path / "labels"


def test_import_dicom_labels_missing_is_an_error(tmp_path, rng, capsys):
    root = tmp_path / "archive"
    study(root, "p", "axial", rng, series_uid="1.2.826.0.1.3680043.8.498.2")
    assert main(["import", "dicom", str(root), "--labels", "seg", "--out", str(tmp_path / "m.csv")]) == 2
    assert "no DICOM SEG object" in capsys.readouterr().err
    assert not (tmp_path / "m.csv").exists()


def test_export_seg_from_a_nifti_in_another_axis_order(tmp_path, rng, capsys):
    folder, geometry = study(tmp_path, "p", "oblique", rng, series_uid="1.2.826.0.1.3680043.8.498.2")
    series = read_volume(folder)
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:8, 5:9, 1:5] = 1
    # saved by another tool in RAS+ order (nibabel as_closest_canonical): same voxels, other layout
    image = nib.Nifti1Image(mask, series.affine)
    canonical = nib.as_closest_canonical(image)
    assert canonical.shape != mask.shape or not np.allclose(canonical.affine, series.affine)
    nib.save(canonical, str(tmp_path / "mask.nii.gz"))
    assert main(["export-seg", str(tmp_path / "mask.nii.gz"), "--reference", str(folder), "--out", str(tmp_path / "o.dcm"),
                 "--set", "dicom_seg.segment_label=GTV"]) == 0  # fmt: skip
    back, labels = read_dicom_seg(tmp_path / "o.dcm", series.geometry)
    np.testing.assert_array_equal(back, mask)
    assert labels == ["GTV"]
    out = capsys.readouterr().out
    assert PATIENT_ID not in out and PATIENT_NAME not in out


def test_export_seg_refuses_a_mask_on_another_grid(tmp_path, rng, capsys):
    folder, _ = study(tmp_path, "p", "axial", rng, series_uid="1.2.826.0.1.3680043.8.498.2")
    series = read_volume(folder)
    shifted = series.affine.copy()
    shifted[:3, 3] += 0.4
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), shifted), str(tmp_path / "mask.nii.gz"))
    assert main(["export-seg", str(tmp_path / "mask.nii.gz"), "--reference", str(folder), "--out", str(tmp_path / "o.dcm")]) == 2
    err = capsys.readouterr().err
    assert "does not coincide with the series grid" in err and "mask.nii.gz" in err
    assert not (tmp_path / "o.dcm").exists()
    nib.save(nib.Nifti1Image(np.full(SHAPE, 0.5, np.float32), series.affine), str(tmp_path / "prob.nii.gz"))
    assert main(["export-seg", str(tmp_path / "prob.nii.gz"), "--reference", str(folder), "--out", str(tmp_path / "o.dcm")]) == 2
    assert "non-negative integers" in capsys.readouterr().err
    assert main(["export-seg", str(tmp_path / "prob.nii.gz"), "--reference", str(folder), "--out", str(tmp_path / "o.dcm"),
                 "--set", "dicom_seg.colour=red"]) == 2  # fmt: skip
    assert "colour" in capsys.readouterr().err


def test_import_dicom_with_a_damaged_seg_names_the_file(tmp_path, rng, capsys):
    root = tmp_path / "archive"
    folder, geometry = study(root, "p", "axial", rng, series_uid="1.2.826.0.1.3680043.8.498.2")
    seg = write_dicom_seg(np.ones(SHAPE, np.uint8), geometry, folder, root / "p" / "seg.dcm")
    data = seg.read_bytes()
    seg.write_bytes(data[: len(data) - 200])  # truncated pixel data
    assert main(["import", "dicom", str(root), "--labels", "seg", "--out", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err
    assert "seg.dcm" in err and "Traceback" not in err
    assert not (tmp_path / "m.csv").exists()
