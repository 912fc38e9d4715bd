from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import GEOMETRIES, make_affine, write_nifti
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from medseg.config import LabelConfig
from medseg.errors import GeometryMismatchError, InputFileError
from medseg.io import (
    Geometry,
    SimpleITKReader,
    check_same_grid,
    preserve_locale,
    read_volume,
    write_mask,
)
from medseg.labels import map_labels, read_label


@pytest.mark.parametrize("kind", GEOMETRIES)
def test_mask_roundtrip_on_source_grid(tmp_path, rng, kind):
    affine = make_affine(kind, spacing=(0.7, 0.9, 3.2))
    image = (rng.random((30, 26, 11)) * 1000).astype(np.int16)
    src = write_nifti(tmp_path / "img.nii.gz", image, affine)
    volume = read_volume(src)
    assert volume.shape == image.shape
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(volume.array, image)

    mask = (image > 500).astype(np.uint8)
    out = write_mask(mask, volume, tmp_path / "mask.nii.gz")
    written = nib.load(str(out))
    assert written.shape == image.shape
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask)  # voxels land where they were
    # the world position of a voxel is the same in source and mask
    ijk = np.array([3, 7, 5, 1.0])
    np.testing.assert_allclose(written.affine @ ijk, nib.load(str(src)).affine @ ijk, atol=1e-4)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
@pytest.mark.parametrize("kind", ["lps", "oblique"])
def test_other_formats_roundtrip(tmp_path, rng, suffix, kind):
    affine = make_affine(kind)
    geometry = Geometry.from_affine(affine, (20, 18, 7))
    image = sitk.GetImageFromArray((rng.random((7, 18, 20)) * 100).astype(np.float32))
    geometry.apply_to(image)
    path = tmp_path / f"img{suffix}"
    sitk.WriteImage(image, str(path))
    volume = read_volume(path)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    out = write_mask((volume.array > 50).astype(np.uint8), volume, tmp_path / "m.nii.gz")
    np.testing.assert_allclose(nib.load(str(out)).affine, affine, atol=1e-5)


def test_dicom_series_folder(tmp_path, rng):
    affine = make_affine("lps", spacing=(0.8, 0.8, 2.5))
    arr = (rng.random((16, 14, 6)) * 1000).astype(np.int16)
    image = sitk.GetImageFromArray(arr.transpose(2, 1, 0).copy())
    Geometry.from_affine(affine, arr.shape).apply_to(image)
    series = tmp_path / "series"
    series.mkdir()
    write_dicom_series(image, series)
    volume = read_volume(series)
    assert volume.shape == arr.shape
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(volume.array, arr)


def test_channels_load_in_parallel_with_the_same_arrays_and_locale(tmp_path, rng):
    """``LoadVolumed`` reads its keys in threads: DICOM series (GDCM changes the process
    locale) and NIfTI side by side give the arrays read one by one, and the locale survives."""
    import locale

    from medseg.transforms.loading import LoadVolumed

    affine = make_affine("lps", spacing=(0.8, 0.8, 2.5))
    arrays, files = {}, {}
    for i, key in enumerate(["a", "b", "c", "d"]):
        arrays[key] = (rng.random((16, 14, 6)) * 1000).astype(np.int16)
        if i < 2:
            image = sitk.GetImageFromArray(arrays[key].transpose(2, 1, 0).copy())
            Geometry.from_affine(affine, arrays[key].shape).apply_to(image)
            files[key] = tmp_path / f"series_{key}"
            files[key].mkdir()
            write_dicom_series(image, files[key])
        else:
            files[key] = write_nifti(tmp_path / f"{key}.nii.gz", arrays[key], affine)
    before = locale.setlocale(locale.LC_CTYPE)
    for _ in range(3):
        loaded = LoadVolumed(list(files))({k: str(v) for k, v in files.items()})
        for key, arr in arrays.items():
            assert loaded[key].is_contiguous()
            np.testing.assert_array_equal(np.asarray(loaded[key]), arr)
            np.testing.assert_allclose(np.asarray(loaded[key].affine), affine, atol=1e-4)
    assert locale.setlocale(locale.LC_CTYPE) == before


def write_dicom_series(image: sitk.Image, folder, modality: str = "CT", patient_id: str = "SECRET-123") -> None:
    """Write ``image`` as a DICOM series (one file per slice) with geometry tags."""
    with preserve_locale():  # GDCM switches the process locale to "C"
        _write_dicom_series(image, folder, modality, patient_id)


def _write_dicom_series(image: sitk.Image, folder, modality: str, patient_id: str) -> None:
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.1"
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        sl.SetMetaData("0008|0060", modality)
        sl.SetMetaData("0010|0010", "Doe^Jane")
        sl.SetMetaData("0010|0020", patient_id)
        sl.SetMetaData("0010|0030", "19700101")
        sl.SetMetaData("0020|000e", series_uid)
        sl.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.1")
        sl.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        sl.SetMetaData("0020|0037", "\\".join(map(str, (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0018|0050", str(image.GetSpacing()[2]))
        sl.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


def test_monai_loadimaged_uses_our_reader(tmp_path, rng):
    affine = make_affine("oblique")
    arr = (rng.random((12, 10, 5)) * 10).astype(np.float32)
    path = write_nifti(tmp_path / "a.nii.gz", arr, affine)
    data = Compose([LoadImaged(["img"], reader=SimpleITKReader(), image_only=True), EnsureChannelFirstd(["img"])])({"img": str(path)})
    assert tuple(data["img"].shape) == (1, 12, 10, 5)
    np.testing.assert_allclose(np.asarray(data["img"].affine), affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(data["img"][0]), arr)


# ----------------------------------------------------------------------------- bad input


def _nifti_bytes(tmp_path, rng):
    path = write_nifti(tmp_path / "good.nii.gz", (rng.random((32, 32, 16)) * 100).astype(np.int16), np.eye(4))
    return path.read_bytes()


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="file not found") as info:
        read_volume(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(info.value)


def test_truncated_gzip_is_detected(tmp_path, rng):
    data = _nifti_bytes(tmp_path, rng)
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match="truncated") as info:
        read_volume(bad)
    assert "trunc.nii.gz" in str(info.value)


def test_corrupt_gzip_and_garbage(tmp_path, rng):
    data = _nifti_bytes(tmp_path, rng)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(data[:40] + bytes(b ^ 0xFF for b in data[40:200]) + data[200:])
    with pytest.raises(InputFileError, match="corrupt"):
        read_volume(corrupt)
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"this is not an image" * 10)
    with pytest.raises(InputFileError, match="garbage.nrrd: cannot read"):
        read_volume(garbage)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(InputFileError, match="empty"):
        read_volume(empty)


def test_multimember_gzip_still_reads(tmp_path, rng):
    """bgzip-style multi-member streams: the trailer check fails, full decompression passes."""
    arr = (rng.random((16, 16, 8)) * 100).astype(np.int16)
    raw_path = write_nifti(tmp_path / "raw.nii", arr, np.eye(4))
    raw = raw_path.read_bytes()
    path = tmp_path / "multi.nii.gz"
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    np.testing.assert_array_equal(read_volume(path).array, arr)


def test_4d_rejected_but_singleton_4th_dim_accepted(tmp_path, rng):
    four = write_nifti(tmp_path / "four.nii.gz", rng.random((8, 8, 4, 3)).astype(np.float32), np.eye(4))
    with pytest.raises(InputFileError, match="4-D"):
        read_volume(four)
    single = write_nifti(tmp_path / "single.nii.gz", rng.random((8, 8, 4, 1)).astype(np.float32), np.eye(4))
    assert read_volume(single).shape == (8, 8, 4)


def test_nan_rejected(tmp_path, rng):
    arr = rng.random((8, 8, 4)).astype(np.float32)
    arr[1, 2, 3] = np.nan
    arr[0, 0, 0] = np.inf
    path = write_nifti(tmp_path / "nan.nii.gz", arr, np.eye(4))
    with pytest.raises(InputFileError, match="2 NaN/Inf"):
        read_volume(path)


def test_label_mapping_and_unexpected_values(tmp_path):
    raw = np.zeros((6, 6, 3), dtype=np.int16)
    raw[0, 0, 0], raw[1, 1, 1], raw[2, 2, 2] = 1, 2, 4
    np.testing.assert_array_equal(map_labels(raw, LabelConfig(), "x"), raw > 0)
    np.testing.assert_array_equal(map_labels(raw, LabelConfig(foreground=[1, 4]), "x"), np.isin(raw, [1, 4]))
    with pytest.raises(InputFileError, match=r"lab.nii.gz: unexpected label value\(s\) \[4\]"):
        path = write_nifti(tmp_path / "lab.nii.gz", raw, np.eye(4))
        read_label(path, LabelConfig(allowed_values=[0, 1, 2]))
    mask255 = (raw > 0).astype(np.uint8) * 255
    np.testing.assert_array_equal(map_labels(mask255, LabelConfig(allowed_values=[0, 255]), "x"), raw > 0)
    with pytest.raises(InputFileError, match="non-integer"):
        map_labels(np.full((2, 2, 2), 0.5, dtype=np.float32), LabelConfig(), "interp.nii.gz")


def test_grid_mismatch(tmp_path, rng):
    a = read_volume(write_nifti(tmp_path / "a.nii.gz", rng.random((8, 8, 4)).astype(np.float32), np.eye(4)))
    b = read_volume(write_nifti(tmp_path / "b.nii.gz", rng.random((8, 8, 5)).astype(np.float32), np.eye(4)))
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    c = read_volume(write_nifti(tmp_path / "c.nii.gz", rng.random((8, 8, 4)).astype(np.float32), shifted))
    with pytest.raises(GeometryMismatchError, match=r"a.nii.gz vs .*b.nii.gz: shape \(8, 8, 4\) vs"):
        check_same_grid(a, b)
    with pytest.raises(GeometryMismatchError, match="different affines"):
        check_same_grid(a, c)
    check_same_grid(a, a)


def test_write_refuses_wrong_shape(tmp_path, rng):
    volume = read_volume(write_nifti(tmp_path / "a.nii.gz", rng.random((8, 8, 4)).astype(np.float32), np.eye(4)))
    with pytest.raises(GeometryMismatchError, match="differs from the source grid"):
        write_mask(np.zeros((8, 8, 5), np.uint8), volume, tmp_path / "m.nii.gz")
    assert not list(tmp_path.glob("*partial*"))


@pytest.mark.parametrize("chunk_planes", [1, 4, None], ids=["plane_by_plane", "uneven_chunks", "default"])
@pytest.mark.parametrize("dtype", [np.bool_, np.uint8, np.int16, np.uint16, ">i2", np.int32, np.uint32, np.float32, np.float64])
def test_reader_arrays_are_c_contiguous_copies_with_the_same_values(dtype, chunk_planes, monkeypatch):
    """The reader hands MONAI (I, J, K) arrays already C-contiguous (torch's copy where torch
    supports the dtype, numpy's otherwise), so ``LoadImage`` makes no second copy. The
    transposing copy goes in chunks of J planes: 6 planes in chunks of 4 leave a short last one."""
    from medseg import volume
    from medseg.volume import contiguous

    if chunk_planes is not None:
        monkeypatch.setattr(volume, "TRANSPOSE_CHUNK_BYTES", chunk_planes * 5 * 7 * np.dtype(dtype).itemsize)
    values = np.arange(5 * 6 * 7).reshape(7, 6, 5)
    buffer = (values % 3 if dtype is np.bool_ else values).astype(dtype)  # distinct values: a misplaced voxel shows
    for view in (buffer.transpose(2, 1, 0), buffer.transpose(1, 2, 0), buffer[:, ::2]):  # (K, J, I) seen as (I, J, K); others
        out = contiguous(view)
        assert out.flags.c_contiguous and out.dtype == view.dtype
        np.testing.assert_array_equal(out, view)
        assert contiguous(out) is out
