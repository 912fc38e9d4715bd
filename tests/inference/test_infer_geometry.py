"""Acceptance: an identity-like model reproduces the input mask exactly on the source grid.

The input image is a CT phantom (air, body, lesions at 200 HU); after the checkpoint's
preprocessing (orientation to RAS, body crop, HU window) the model thresholds the centre
slice's normalised value, so the whole chain (2.5D stacks, windows, inversion to the source
grid, writing) must give back the lesion mask voxel for voxel.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from conftest import GEOMETRIES, make_affine, write_nifti
from infer_helpers import ct_phantom, identity_bundle
from test_io import write_dicom_series

from medseg.config import InferenceConfig, PreprocessConfig
from medseg.geometry import label_components as label_lesions
from medseg.inference.cases import InferenceCase
from medseg.inference.runner import CasePredictor
from medseg.io import Geometry, read_volume


def _check_outputs(out_dir, case_id, lesion, affine):
    mask_img = nib.load(str(out_dir / f"{case_id}_mask.nii.gz"))
    assert mask_img.get_data_dtype() == np.uint8
    assert mask_img.shape == lesion.shape
    np.testing.assert_allclose(mask_img.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(mask_img.dataobj), lesion)
    instances_img = nib.load(str(out_dir / f"{case_id}_lesions.nii.gz"))
    assert instances_img.get_data_dtype() == np.uint8  # a few lesions: the smallest type that holds their ids
    instances = np.asarray(instances_img.dataobj)
    expected, n = label_lesions(lesion)
    np.testing.assert_array_equal(instances, expected)
    table = pd.read_csv(out_dir / f"{case_id}_lesions.csv")
    assert len(table) == n and table.voxels.sum() == lesion.sum()
    assert (table.score_mean > 0.99).all()


@pytest.mark.parametrize("kind", GEOMETRIES)
@pytest.mark.parametrize("context", [0, 1])
def test_nifti_identity_on_source_grid(tmp_path, rng, kind, context):
    affine = make_affine(kind, spacing=(0.7, 0.9, 3.2))  # anisotropic
    image, lesion = ct_phantom((34, 30, 10), rng)
    path = write_nifti(tmp_path / "scan.nii.gz", image, affine)
    predictor = CasePredictor(identity_bundle(context=context))
    predictor.run_case(InferenceCase("scan", {"ct": path}), tmp_path / "out")
    _check_outputs(tmp_path / "out", "scan", lesion, affine)


def test_identity_survives_tiled_windows_and_tta(tmp_path, rng):
    affine = make_affine("oblique", spacing=(0.8, 0.8, 2.0))
    image, lesion = ct_phantom((52, 44, 9), rng)
    path = write_nifti(tmp_path / "scan.nii.gz", image, affine)
    inference = InferenceConfig(roi_size=(24, 16), overlap=0.5, tta=True, min_lesion_mm3=0.0, write_prob=True)
    CasePredictor(identity_bundle(inference=inference)).run_case(InferenceCase("scan", {"ct": path}), tmp_path / "out")
    _check_outputs(tmp_path / "out", "scan", lesion, affine)
    prob = nib.load(str(tmp_path / "out" / "scan_prob.nii.gz"))
    assert prob.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(prob.dataobj) >= 0.5, lesion > 0)


@pytest.mark.parametrize("axis", ["coronal", "sagittal"])
def test_identity_with_other_slice_axes(tmp_path, rng, axis):
    affine = make_affine("lps", spacing=(1.1, 0.9, 2.0))
    image, lesion = ct_phantom((30, 28, 12), rng)
    path = write_nifti(tmp_path / "scan.nii.gz", image, affine)
    preprocess = PreprocessConfig(slice_axis=axis, context_slices=1, crop_margin=1)
    CasePredictor(identity_bundle(preprocess=preprocess)).run_case(InferenceCase("scan", {"ct": path}), tmp_path / "out")
    _check_outputs(tmp_path / "out", "scan", lesion, affine)


@pytest.mark.parametrize("kind", ["lps", "oblique"])
def test_dicom_series_identity_on_source_grid(tmp_path, rng, kind):
    affine = make_affine(kind, spacing=(0.7, 0.9, 3.2))
    image, lesion = ct_phantom((34, 30, 10), rng)
    geometry = Geometry.from_affine(affine, image.shape)
    itk = sitk.GetImageFromArray(np.ascontiguousarray(image.transpose(2, 1, 0)))
    geometry.apply_to(itk)
    folder = tmp_path / "series"
    folder.mkdir()
    write_dicom_series(itk, folder, patient_id="SECRET-123")
    source = read_volume(folder)
    CasePredictor(identity_bundle()).run_case(InferenceCase("series", {"ct": folder}), tmp_path / "out")
    _check_outputs(tmp_path / "out", "series", lesion, source.affine)
    written = read_volume(tmp_path / "out" / "series_mask.nii.gz")
    np.testing.assert_allclose(written.geometry.direction, source.geometry.direction, atol=1e-6)
    np.testing.assert_allclose(written.geometry.origin, source.geometry.origin, atol=1e-4)
    for path in (tmp_path / "out").iterdir():  # no patient identifier leaks into any output
        data = path.read_bytes()
        assert b"SECRET-123" not in data and b"Doe^Jane" not in data


def test_inplane_resampling_maps_back_to_the_source_grid(tmp_path, rng):
    affine = make_affine("lps", spacing=(0.6, 0.6, 3.0))
    image, lesion = ct_phantom((60, 56, 10), rng)
    lesion[:] = 0
    lesion[20:36, 18:34, 3:7] = 1  # a large lesion: resampling keeps it up to its border
    image[image == 200] = 0
    image[lesion > 0] = 200
    path = write_nifti(tmp_path / "scan.nii.gz", image, affine)
    preprocess = PreprocessConfig(spacing_inplane=(1.0, 1.0), context_slices=1, crop_margin=2)
    CasePredictor(identity_bundle(preprocess=preprocess)).run_case(InferenceCase("scan", {"ct": path}), tmp_path / "out")
    out = nib.load(str(tmp_path / "out" / "scan_mask.nii.gz"))
    assert out.shape == lesion.shape
    np.testing.assert_allclose(out.affine, affine, atol=1e-4)
    pred = np.asarray(out.dataobj) > 0
    dice = 2 * (pred & (lesion > 0)).sum() / (pred.sum() + lesion.sum())
    assert dice > 0.9  # borders move by up to one 1 mm resampled pixel (1.7 source voxels)
    shift = np.argwhere(pred).mean(axis=0) - np.argwhere(lesion).mean(axis=0)
    assert np.abs(shift).max() < 1.0  # no systematic offset from the resampling round trip


def test_real_nrrd_label_reproduced_on_its_grid(tmp_path, requires_nrrd):
    """A real NRRD label read as a 1-channel CT (0 / 1 HU -> 0.4 / 0.4025 after the window)."""
    from infer_helpers import ChannelThreshold

    label = requires_nrrd / "brain1_label.nrrd"
    source = read_volume(label)
    bundle = identity_bundle(preprocess=PreprocessConfig(context_slices=1, crop_foreground=False))
    bundle.models = [ChannelThreshold(1, 0.40125, gain=4000.0).eval()]
    CasePredictor(bundle).run_case(InferenceCase("brain1", {"ct": label}), tmp_path / "out")
    written = read_volume(tmp_path / "out" / "brain1_mask.nii.gz")
    np.testing.assert_array_equal(written.array, (source.array > 0).astype(np.uint8))
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    assert written.array.sum() > 0
