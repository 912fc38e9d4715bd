"""Small synthetic DICOM objects for tests, written with pydicom: CT/MR image series (any
geometry, any file and InstanceNumber order), RTSTRUCTs with given contours."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg.io import Geometry

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
PATIENT_ID = "SECRET-123"
PATIENT_NAME = "Doe^Jane"


def rotation(axis: int, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    r = np.eye(3)
    a, b = [i for i in range(3) if i != axis]
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


GEOMETRIES = {
    "axial": np.eye(3),
    "oblique": rotation(0, 0.3) @ rotation(2, -0.4),
    "axial_k_to_feet": np.diag([1.0, 1.0, -1.0]) @ np.diag([1.0, -1.0, 1.0]),  # k runs to the feet, rows posterior to anterior
    "coronal": np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]),
}


#: spacing (I, J, K) in mm and origin (LPS) of :func:`ct_phantom_series`'s grid
SERIES_SPACING = (0.7, 0.9, 3.2)
SERIES_ORIGIN = (-20.0, 31.5, 12.0)


def ct_phantom_series(shape: tuple[int, int, int], rng: np.random.Generator,
                      kind: str = "oblique") -> tuple[np.ndarray, np.ndarray, Geometry]:  # fmt: skip
    """``infer_helpers.ct_phantom`` (air, a body box, three lesions at 200 HU) on a
    :data:`GEOMETRIES` ``kind`` grid of :data:`SERIES_SPACING` and :data:`SERIES_ORIGIN`: returns
    ``(image, lesion mask, geometry)``, both arrays (I, J, K) = ``shape``, for :func:`write_series`."""
    from infer_helpers import ct_phantom

    image, lesion = ct_phantom(shape, rng)
    return image, lesion, Geometry(image.shape, SERIES_SPACING, SERIES_ORIGIN, tuple(GEOMETRIES[kind].ravel()))


def _base(sop_class: str, sop_uid: str, modality: str):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, sop_uid, modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, PATIENT_ID, "19700101", "F"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = STUDY_UID, "20260101", "120000", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = "ACC1", ""
    ds.Manufacturer = "test"
    return ds


def write_series(
    folder: str | Path,
    array: np.ndarray,
    geometry: Geometry,
    modality: str = "CT",
    order: str = "ascending",
    series_uid: str = "1.2.826.0.1.3680043.8.498.2",
    frame_of_reference: str = "1.2.826.0.1.3680043.8.498.3",
) -> list[Path]:
    """Write ``array`` (I, J, K) on ``geometry`` (LPS) as single-frame instances, one per K slice.

    ``order``: file names and InstanceNumbers ``ascending`` in k, ``descending``, or ``shuffled``
    (readers must place slices by Image Position (Patient), not by name or number)."""
    from pydicom.uid import CTImageStorage, MRImageStorage

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = array.shape[2]
    numbers = list(range(n))
    if order == "descending":
        numbers = numbers[::-1]
    elif order == "shuffled":
        numbers = list(np.random.default_rng(7).permutation(n))
    direction = np.asarray(geometry.direction).reshape(3, 3)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    paths = []
    for k in range(n):
        uid = f"{series_uid}.{k + 1}"
        ds = _base(sop_class, uid, modality)
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.FrameOfReferenceUID = series_uid, 3, frame_of_reference
        ds.InstanceNumber = int(numbers[k]) + 1
        position = np.asarray(geometry.origin) + direction[:, 2] * geometry.spacing[2] * k
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{geometry.spacing[1]:.6f}", f"{geometry.spacing[0]:.6f}"]  # row (J), column (I)
        ds.SliceThickness = f"{geometry.spacing[2]:.6f}"
        ds.Rows, ds.Columns = array.shape[1], array.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = np.ascontiguousarray(array[:, :, k].T.astype(np.int16)).tobytes()
        path = folder / f"img{int(numbers[k]):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_rtstruct(
    path: str | Path,
    series_folder: str | Path,
    rois: dict[str, Sequence[np.ndarray]],
    series_uid: str = "1.2.826.0.1.3680043.8.498.2",
    frame_of_reference: str = "1.2.826.0.1.3680043.8.498.3",
) -> Path:
    """An RTSTRUCT referencing the series in ``series_folder``: ``rois`` maps ROI names to closed
    planar contours, each an (N, 3) array of LPS points (mm)."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DSequence
    from pydicom.uid import RTStructureSetStorage

    uid = "1.2.826.0.1.3680043.8.498.9"
    ds = _base(RTStructureSetStorage, uid, "RTSTRUCT")
    ds.SeriesInstanceUID, ds.SeriesNumber = uid + ".1", 99
    ds.StructureSetLabel, ds.StructureSetDate, ds.StructureSetTime = "test", "20260101", "120000"
    images = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(Path(series_folder).glob("*.dcm"))]
    contour_images = []
    for image in images:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = image.SOPClassUID, image.SOPInstanceUID
        contour_images.append(item)
    series = Dataset()
    series.SeriesInstanceUID, series.ContourImageSequence = series_uid, DSequence(contour_images)
    study = Dataset()
    study.ReferencedSOPClassUID, study.ReferencedSOPInstanceUID = "1.2.840.10008.3.1.2.3.1", STUDY_UID
    study.RTReferencedSeriesSequence = DSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID, frame.RTReferencedStudySequence = frame_of_reference, DSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DSequence([frame])
    roi_items, contour_items, observations = [], [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, frame_of_reference, name
        roi.ROIGenerationAlgorithm = "MANUAL"
        roi_items.append(roi)
        item = Dataset()
        item.ReferencedROINumber, item.ROIDisplayColor = number, [255, 0, 0]
        contour_list = []
        for points in contours:
            contour = Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [f"{v:.6f}" for v in np.asarray(points, dtype=float).ravel()]
            contour_list.append(contour)
        item.ContourSequence = DSequence(contour_list)
        contour_items.append(item)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber, obs.RTROIInterpretedType, obs.ROIInterpreter = number, number, "GTV", ""
        observations.append(obs)
    ds.StructureSetROISequence = DSequence(roi_items)
    ds.ROIContourSequence = DSequence(contour_items)
    ds.RTROIObservationsSequence = DSequence(observations)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
