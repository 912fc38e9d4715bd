"""Rasterise RTSTRUCT contours onto an image grid.

Each CLOSED_PLANAR contour is a polygon of LPS points (mm) on one image slice. Its points are
mapped to continuous (i, j, k) indices of the grid; all must share one integer k (the contour
lies on a slice of the grid, not between two). The polygon is filled in the (i, j) plane with
voxel centres inside it (scikit-image ``polygon``). Several contours of one ROI on one slice
combine by the even-odd rule -- a contour inside another is a hole, two disjoint ones are two
islands -- the convention of RTSTRUCT exporters (Eclipse, RayStation) and of plastimatch.
Contours of other types (POINT, OPEN_PLANAR) enclose nothing and are skipped.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from medseg.dicom.series import grid_index
from medseg.errors import InputFileError
from medseg.io import Geometry

log = logging.getLogger(__name__)

# contour points may sit this far (in slices) from the slice they belong to
SLICE_TOLERANCE = 0.1


def roi_names(ds) -> dict[int, str]:
    """ROI number -> ROI name of an RTSTRUCT dataset."""
    return {int(item.ROINumber): str(getattr(item, "ROIName", "")) for item in getattr(ds, "StructureSetROISequence", [])}


def referenced_series(ds) -> list[str]:
    """SeriesInstanceUIDs an RTSTRUCT's contours reference."""
    out = []
    for frame in getattr(ds, "ReferencedFrameOfReferenceSequence", []):
        for study in getattr(frame, "RTReferencedStudySequence", []):
            out += [str(s.SeriesInstanceUID) for s in getattr(study, "RTReferencedSeriesSequence", []) if "SeriesInstanceUID" in s]
    return out


def fill_polygon(mask_slice: np.ndarray, points_ij: np.ndarray) -> None:
    """XOR the polygon ``points_ij`` ((N, 2) continuous (i, j) indices) into the (I, J) slice:
    voxels whose centre is inside flip (even-odd rule for holes)."""
    from skimage.draw import polygon

    ii, jj = polygon(points_ij[:, 0], points_ij[:, 1], shape=mask_slice.shape)
    mask_slice[ii, jj] ^= 1


def read_rtstruct(path: str | Path, geometry: Geometry, rois: str | None = None) -> tuple[np.ndarray, list[str]]:
    """The union of the selected ROIs of the RTSTRUCT at ``path`` as a uint8 (I, J, K) mask on
    ``geometry``, and the names of the ROIs used.

    ``rois``: regular expression matched (case-insensitive, anywhere) against ROI names; ``None``
    = every ROI with contours. Raises ``InputFileError`` naming the file when a contour is off
    the grid's slices or outside it."""
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises several types for damaged files
        raise InputFileError(path, f"cannot read DICOM ({exc})") from None
    if str(getattr(ds, "Modality", "")) != "RTSTRUCT":
        raise InputFileError(path, f"not an RTSTRUCT (Modality {getattr(ds, 'Modality', None)!r})")
    names = roi_names(ds)
    chosen = {n: name for n, name in names.items() if rois is None or re.search(rois, name, re.IGNORECASE)}
    if not chosen:
        raise InputFileError(path, f"no ROI name matches {rois!r} (ROIs: {sorted(names.values())})")
    mask = np.zeros(geometry.size, dtype=np.uint8)
    used: set[str] = set()
    for item in getattr(ds, "ROIContourSequence", []):
        number = int(item.ReferencedROINumber)
        if number not in chosen:
            continue
        roi = np.zeros(geometry.size, dtype=np.uint8)
        for c, contour in enumerate(getattr(item, "ContourSequence", [])):
            if str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue
            points = np.asarray([float(v) for v in contour.ContourData], dtype=np.float64).reshape(-1, 3)
            if len(points) < 3:
                continue
            index = grid_index(geometry, points)
            k = int(np.rint(index[:, 2].mean()))
            if np.abs(index[:, 2] - k).max() > SLICE_TOLERANCE:
                raise InputFileError(path, f"ROI {chosen[number]!r} contour {c + 1} is not on one slice of the image "
                                           f"grid (slice index {index[:, 2].min():.2f}..{index[:, 2].max():.2f})")
            if not 0 <= k < geometry.size[2]:
                raise InputFileError(path, f"ROI {chosen[number]!r} contour {c + 1} lies outside the image "
                                           f"(slice {k} of {geometry.size[2]})")
            fill_polygon(roi[:, :, k], index[:, :2])
        if roi.any():
            used.add(chosen[number])
            mask |= roi
    if not used:
        log.warning("%s: the selected ROIs %s have no closed contour", path.name, sorted(chosen.values()))
    return mask, sorted(used)
