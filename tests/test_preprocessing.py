from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import GEOMETRIES, make_affine, write_nifti
from monai.data import MetaTensor
from monai.transforms import Invertd

from medseg.config import LabelConfig, PreprocessConfig
from medseg.errors import GeometryMismatchError, InputFileError
from medseg.transforms.loading import apply_chain
from medseg.transforms.preprocessing import context_stack, foreground_mask, preprocess_transforms


def _mr_case(tmp_path, affine, rng, shape=(40, 36, 14)):
    brain = np.zeros(shape, dtype=bool)
    brain[6:34, 5:30, 2:12] = True
    flair = np.where(brain, rng.normal(300, 20, shape), 0).astype(np.int16)
    t1 = np.where(brain, rng.normal(500, 30, shape), 0).astype(np.int16)
    flair[10, 10, 5] = 32767  # saturated outlier, as in BraTS FLAIR
    label = np.zeros(shape, np.uint8)
    label[12:18, 10:15, 4:8] = 2
    label[20:22, 20:22, 9] = 4
    paths = {
        "image_flair": str(write_nifti(tmp_path / "flair.nii.gz", flair, affine)),
        "image_t1": str(write_nifti(tmp_path / "t1.nii.gz", t1, affine)),
        "label": str(write_nifti(tmp_path / "seg.nii.gz", label, affine)),
    }
    return paths, brain, label


@pytest.mark.parametrize("kind", GEOMETRIES)
def test_mr_chain_and_exact_inversion(tmp_path, rng, kind):
    affine = make_affine(kind, spacing=(0.9, 1.1, 3.0))
    paths, brain, label = _mr_case(tmp_path, affine, rng)
    chain = preprocess_transforms(PreprocessConfig(crop_margin=2, crop_margin_slices=1), "MR", ["flair", "t1"], True,
                                  LabelConfig(allowed_values=[0, 1, 2, 4]))
    out = apply_chain(chain, dict(paths))
    image, lab = out["image"], out["label"]
    assert image.dtype == torch.float32 and lab.dtype == torch.uint8 and image.shape[0] == 2
    assert int(lab.sum()) == int((label > 0).sum())  # the crop keeps every lesion voxel
    assert image.shape[1:] == lab.shape[1:] and all(s < f for s, f in zip(image.shape[1:], label.shape, strict=False))
    inside = image[0][torch.from_numpy(np.ones(image.shape[1:], bool))]
    assert float(inside.max()) < 10  # the 32767 outlier was clipped by the percentile window
    # a prediction on the preprocessed grid maps back exactly onto the source grid
    pred = MetaTensor(lab.float(), meta=image.meta, applied_operations=image.applied_operations)
    back = Invertd("pred", chain, orig_keys="image", nearest_interp=True)({**out, "pred": pred})["pred"]
    np.testing.assert_array_equal(np.asarray(back[0]) > 0.5, label > 0)
    np.testing.assert_allclose(np.asarray(back.affine), nib.load(paths["label"]).affine, atol=1e-4)


def test_ct_window_and_body_crop(tmp_path, rng):
    shape = (30, 30, 10)
    ct = np.full(shape, -1000, np.int16)
    ct[5:25, 6:24, 2:8] = 40
    ct[10:12, 10:12, 4] = 1500
    path = write_nifti(tmp_path / "ct.nii.gz", ct, make_affine("lps"))
    cfg = PreprocessConfig(ct_window=(-100, 200), crop_margin=1, crop_margin_slices=0)
    out = apply_chain(preprocess_transforms(cfg, "CT", ["ct"], False), {"image_ct": str(path)})
    image = out["image"]
    assert tuple(image.shape) == (1, 22, 20, 6)
    assert float(image.max()) == 1.0 and float(image.min()) == 0.0
    assert torch.isclose(image[0, 5, 5, 2], torch.tensor(140 / 300))


def test_errors_surface_with_file_names(tmp_path, rng):
    affine = make_affine("ras")
    paths, _, label = _mr_case(tmp_path, affine, rng)
    write_nifti(tmp_path / "seg.nii.gz", label[:, :, :13], affine)
    chain = preprocess_transforms(PreprocessConfig(), "MR", ["flair", "t1"], True)
    with pytest.raises(GeometryMismatchError, match="seg.nii.gz"):
        apply_chain(chain, dict(paths))
    write_nifti(tmp_path / "seg.nii.gz", label, affine)
    with pytest.raises(InputFileError, match=r"seg.nii.gz: unexpected label value\(s\) \[2, 4\]"):
        apply_chain(preprocess_transforms(PreprocessConfig(), "MR", ["flair", "t1"], True, LabelConfig(allowed_values=[0, 1])),
                    dict(paths))


def test_context_stack_order_and_edges():
    vol = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)  # (C, R, A, S)
    one = context_stack(vol, 0, 1)
    assert tuple(one.shape) == (6, 3, 4)
    # neighbour-major: [z-1: c0, c1, z: c0, c1, z+1: c0, c1]; z-1 clamps to 0 at the edge
    for i, (z, c) in enumerate([(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 1)]):
        torch.testing.assert_close(one[i], vol[c, :, :, z])
    many = context_stack(vol, [2, 4], 2)
    assert tuple(many.shape) == (2, 10, 3, 4)
    torch.testing.assert_close(many[1, -2], vol[0, :, :, 4])  # z+2 clamps to the last slice
    torch.testing.assert_close(many[0, 0], vol[0, :, :, 0])


def test_foreground_mask_rules():
    ct = np.full((1, 4, 4, 4), -1000.0)
    ct[0, 1:3, 1:3, 1:3] = 30
    assert foreground_mask(ct, "CT").sum() == 8
    mr = np.zeros((1, 10, 10, 10))
    mr[0, 2:8, 2:8, 2:8] = 100
    assert foreground_mask(mr, "MR").sum() == 216


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.int32, np.float64])
@pytest.mark.parametrize("spacing_inplane", [None, (1.5, 1.5)])
def test_chain_gives_the_float32_result_whatever_the_file_dtype(tmp_path, rng, dtype, spacing_inplane):
    """The chain carries the files' own dtype until normalisation: uint16 DICOM-like MR, uint8,
    int32 and float64 files give the values their float32 copies give, and invert exactly."""
    affine = make_affine("oblique", spacing=(0.9, 1.1, 3.0))
    shape = (30, 26, 8)
    brain = np.zeros(shape, dtype=bool)
    brain[5:25, 4:22, 1:7] = True
    values = np.where(brain, rng.integers(100, 250, shape), 0)
    cfg = PreprocessConfig(crop_margin=2, crop_margin_slices=1, spacing_inplane=spacing_inplane)
    outs = []
    for name, dt in (("native", dtype), ("float32", np.float32)):
        path = write_nifti(tmp_path / f"{name}.nii.gz", values.astype(dt), affine)
        chain = preprocess_transforms(cfg, "MR", ["t1"], False)
        out = apply_chain(chain, {"image_t1": str(path)})
        assert out["image"].dtype == torch.float32
        outs.append((chain, out))
    torch.testing.assert_close(outs[0][1]["image"].as_tensor(), outs[1][1]["image"].as_tensor())
    chain, out = outs[0]
    image = out["image"]
    pred = MetaTensor(torch.ones((1, *image.shape[1:])), meta=image.meta, applied_operations=image.applied_operations)
    back = Invertd("pred", chain, orig_keys="image", nearest_interp=True)({**out, "pred": pred})["pred"]
    assert tuple(back.shape[1:]) == shape
    np.testing.assert_allclose(np.asarray(back.affine), affine, atol=1e-4)
