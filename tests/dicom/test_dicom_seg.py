"""DICOM SEG written by medseg: frames land exactly on the source instances (highdicom, pydicom,
SimpleITK read it back), for axial/oblique grids, either slice direction and any file order."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_helpers import GEOMETRIES, PATIENT_ID, PATIENT_NAME, write_series

from medseg.config import DicomSegConfig
from medseg.dicom.seg_reader import read_dicom_seg
from medseg.dicom.seg_writer import Algorithm, write_dicom_seg
from medseg.dicom.series import grid_index, place_instances
from medseg.errors import InputFileError, MedsegError
from medseg.io import Geometry, read_volume

hd = pytest.importorskip("highdicom")

SHAPE = (20, 16, 9)


def make_series(tmp_path, kind: str, order: str, rng) -> tuple:
    geometry = Geometry(SHAPE, (0.7, 0.9, 2.5), (-30.5, 12.25, 40.0), tuple(GEOMETRIES[kind].ravel()))
    array = (rng.random(SHAPE) * 1000).astype(np.int16)
    folder = tmp_path / f"series_{kind}_{order}"
    write_series(folder, array, geometry, order=order)
    return folder, read_volume(folder)


def lesion_mask(shape) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[3:9, 4:10, 2:5] = 1
    mask[12:15, 2:4, 6] = 1
    mask[16, 12, 7] = 1
    return mask


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
@pytest.mark.parametrize("kind", list(GEOMETRIES))
def test_seg_frames_land_on_the_source_voxels(tmp_path, rng, kind, order):
    folder, volume = make_series(tmp_path, kind, order, rng)
    mask = lesion_mask(volume.shape)
    out = write_dicom_seg(mask, volume.geometry, folder, tmp_path / "case_seg.dcm",
                          algorithm=Algorithm.from_checkpoints(["ab" * 32]))
    placed = place_instances(folder, volume.geometry)

    # highdicom: frames per source instance (by SOP Instance UID) are the mask's slices
    seg = hd.seg.segread(out)
    pixels = seg.get_pixels_by_source_instance([str(p.dataset.SOPInstanceUID) for p in placed], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0], np.transpose(mask, (2, 1, 0)))
    # the references, the patient and the algorithm
    source = placed[0].dataset
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.PatientID == PATIENT_ID and str(seg.PatientName) == PATIENT_NAME
    assert seg.SegmentationType == "BINARY"
    description = seg.SegmentSequence[0]
    assert description.SegmentLabel == "lesion"
    assert description.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    algorithm = description.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "medseg" and "ab" * 32 in algorithm.AlgorithmParameters

    # medseg's own reader places each frame by its position: the same mask
    back, labels = read_dicom_seg(out, volume.geometry)
    np.testing.assert_array_equal(back, mask)
    assert labels == ["lesion"]


@pytest.mark.parametrize("kind", ["axial", "oblique"])
def test_simpleitk_reads_the_seg_on_the_source_grid(tmp_path, rng, kind):
    folder, volume = make_series(tmp_path, kind, "shuffled", rng)
    mask = np.zeros(volume.shape, np.uint8)
    mask[3:9, 4:10, 2:6] = 1  # slices 2..5: the SEG holds exactly these frames
    out = write_dicom_seg(mask, volume.geometry, folder, tmp_path / "seg.dcm")
    image = sitk.ReadImage(str(out))
    assert image.GetSize() == (SHAPE[0], SHAPE[1], 4)
    # SimpleITK keeps the SEG's frame order (highdicom may store them in either slice direction):
    # every frame, placed by SimpleITK's own geometry, is the mask's slice at that position
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    source = np.asarray(volume.geometry.direction).reshape(3, 3)
    np.testing.assert_allclose(direction[:, :2], source[:, :2], atol=1e-4)
    frames = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    seen = []
    for f in range(frames.shape[2]):
        position = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, f)))
        index = grid_index(volume.geometry, position[None])[0]
        np.testing.assert_allclose(index[:2], 0, atol=1e-3)
        k = int(np.rint(index[2]))
        np.testing.assert_array_equal(frames[:, :, f] > 0, mask[:, :, k] > 0)
        seen.append(k)
    assert sorted(seen) == [2, 3, 4, 5]


def test_fractional_seg_keeps_the_probability(tmp_path, rng):
    folder, volume = make_series(tmp_path, "oblique", "ascending", rng)
    prob = rng.random(volume.shape).astype(np.float32)
    out = write_dicom_seg((prob >= 0.5).astype(np.uint8), volume.geometry, folder, tmp_path / "f.dcm",
                          DicomSegConfig(fractional=True), probability=prob)
    seg = hd.seg.segread(out)
    assert seg.SegmentationType == "FRACTIONAL"
    placed = place_instances(folder, volume.geometry)
    pixels = seg.get_pixels_by_source_instance([str(p.dataset.SOPInstanceUID) for p in placed], segment_numbers=[1])
    np.testing.assert_allclose(pixels[..., 0], np.transpose(prob, (2, 1, 0)), atol=0.5 / 255 + 1e-6)
    back, _ = read_dicom_seg(out, volume.geometry)
    np.testing.assert_array_equal(back, (np.rint(prob * 255) >= 128).astype(np.uint8))


def test_empty_and_multi_class_masks(tmp_path, rng):
    folder, volume = make_series(tmp_path, "axial", "ascending", rng)
    empty = write_dicom_seg(np.zeros(volume.shape, np.uint8), volume.geometry, folder, tmp_path / "e.dcm")
    assert int(pydicom.dcmread(empty).NumberOfFrames) == SHAPE[2]  # one (empty) frame per slice
    assert not read_dicom_seg(empty, volume.geometry)[0].any()
    classes = np.zeros(volume.shape, np.uint8)
    classes[2:6, 2:6, 1:3] = 1
    classes[10:14, 8:12, 4:6] = 2
    out = write_dicom_seg(classes, volume.geometry, folder, tmp_path / "m.dcm", n_classes=2)
    seg = hd.seg.segread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion class 1", "lesion class 2"]
    for value in (1, 2):
        back, labels = read_dicom_seg(out, volume.geometry, segments=f"class {value}$")
        np.testing.assert_array_equal(back, (classes == value).astype(np.uint8))
        assert labels == [f"lesion class {value}"]


def test_seg_settings_are_used(tmp_path, rng):
    folder, volume = make_series(tmp_path, "axial", "ascending", rng)
    settings = DicomSegConfig(segment_label="metastasis", series_number=77, series_description="mets",
                              property_type={"value": "14799000", "scheme": "SCT", "meaning": "Neoplasm, metastatic"})
    out = write_dicom_seg(lesion_mask(volume.shape), volume.geometry, folder, tmp_path / "s.dcm", settings)
    ds = pydicom.dcmread(out)
    assert (ds.SeriesNumber, ds.SeriesDescription) == (77, "mets")
    assert ds.SegmentSequence[0].SegmentLabel == "metastasis"
    assert ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "14799000"


def test_mask_off_the_grid_or_wrong_shape_is_refused(tmp_path, rng):
    folder, volume = make_series(tmp_path, "axial", "ascending", rng)
    with pytest.raises(MedsegError, match="mask shape"):
        write_dicom_seg(np.zeros((3, 3, 3), np.uint8), volume.geometry, folder, tmp_path / "x.dcm")
    shifted = Geometry(volume.geometry.size, volume.geometry.spacing,
                       tuple(np.asarray(volume.geometry.origin) + [0.35, 0, 0]), volume.geometry.direction)
    with pytest.raises(InputFileError, match="not a slice position|not a voxel"):
        write_dicom_seg(lesion_mask(volume.shape), shifted, folder, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()
    out = write_dicom_seg(lesion_mask(volume.shape), volume.geometry, folder, tmp_path / "ok.dcm")
    with pytest.raises(InputFileError, match="not a voxel of the image grid"):
        read_dicom_seg(out, shifted)
    with pytest.raises(InputFileError, match="no segment label matches"):
        read_dicom_seg(out, volume.geometry, segments="liver")


def _labelmap_seg(folder, geometry, labels: np.ndarray, out) -> None:
    """A LABELMAP SEG (DICOM 2024) of the (I, J, K) ``labels`` (values 1 and 2) written by highdicom:
    one frame per slice with a label, each frame holding both segments' numbers as pixel values."""
    from pydicom.sr.codedict import codes

    placed = place_instances(folder, geometry)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=label, segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    ) for number, label in ((1, "liver lesion"), (2, "kidney lesion"))]  # fmt: skip
    seg = hd.seg.Segmentation(
        source_images=[p.dataset for p in placed], pixel_array=np.ascontiguousarray(np.transpose(labels, (2, 1, 0))),
        segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="1", device_serial_number="1",
    )  # fmt: skip
    seg.save_as(out)


@pytest.mark.parametrize("spacing_between_slices", [True, False])
def test_labelmap_seg_reads_each_segment_and_both(tmp_path, rng, spacing_between_slices):
    """LABELMAP: the pixel values of a frame are segment numbers (the old reader read any
    non-FRACTIONAL frame as one binary segment and refused it: no Referenced Segment Number).
    Frames only on slices 1, 3, 6 (gaps of 2 and 3 slices), with or without Spacing Between
    Slices (optional in a SEG): placed by their positions all the same."""
    folder, volume = make_series(tmp_path, "oblique", "shuffled", rng)
    labels = np.zeros(volume.shape, np.uint8)
    labels[2:6, 3:7, 1] = 1
    labels[10:13, 8:12, 1] = 2  # both segments on one frame
    labels[4:9, 2:5, 3] = 2
    labels[15:18, 1:3, 6] = 1
    out = tmp_path / "labelmap.dcm"
    _labelmap_seg(folder, volume.geometry, labels, out)
    if not spacing_between_slices:
        ds = pydicom.dcmread(out)
        del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices
        ds.save_as(out)
    ds = pydicom.dcmread(out)
    assert ds.SegmentationType == "LABELMAP" and int(ds.NumberOfFrames) == 3
    assert "SegmentIdentificationSequence" not in ds.SharedFunctionalGroupsSequence[0]
    for select, values, names in (("liver", [1], ["liver lesion"]), ("kidney", [2], ["kidney lesion"]),
                                  (None, [1, 2], ["kidney lesion", "liver lesion"])):  # fmt: skip
        back, used = read_dicom_seg(out, volume.geometry, segments=select)
        assert back.dtype == np.uint8 and back.shape == volume.shape
        np.testing.assert_array_equal(back, np.isin(labels, values).astype(np.uint8))
        assert used == names


def test_seg_with_another_pixel_spacing_is_refused(tmp_path, rng):
    """Frames at grid positions but with half the grid's pixel spacing: another grid, not placed."""
    folder, volume = make_series(tmp_path, "axial", "ascending", rng)
    out = write_dicom_seg(lesion_mask(volume.shape), volume.geometry, folder, tmp_path / "s.dcm")
    ds = pydicom.dcmread(out)
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    measures.PixelSpacing = [float(v) / 2 for v in measures.PixelSpacing]
    ds.save_as(out)
    with pytest.raises(InputFileError, match="pixel spacing .* is not the image grid's"):
        read_dicom_seg(out, volume.geometry)
