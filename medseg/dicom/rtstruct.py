"""Rasterise RTSTRUCT contours onto an image grid.

Each CLOSED_PLANAR contour is a polygon of LPS points (mm) on one image slice. Its points are
mapped to continuous (i, j, k) indices of the grid; all must share one integer k (the contour
lies on a slice of the grid, not between two). The polygon is filled in the (i, j) plane with
voxel centres inside it (scikit-image ``polygon``). Several contours of one ROI on one slice
combine by the even-odd rule -- a contour inside another is a hole, two disjoint ones are two
islands -- the convention of RTSTRUCT exporters (Eclipse, RayStation) and of plastimatch.
Contours of other types (POINT, OPEN_PLANAR) enclose nothing and are skipped. A contour that
reaches beyond the image in-plane (more than one voxel past its edge) is refused, never clipped:
contours are drawn on the image they belong to, so one off the image means a wrong pairing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medseg.dicom.seg_reader import compile_select, read_label_object
from medseg.dicom.series import grid_index
from medseg.errors import InputFileError
from medseg.io import Geometry

log = logging.getLogger(__name__)

# contour points may sit this far (in slices) from the slice they belong to
SLICE_TOLERANCE = 0.1
# and this far (in voxels) beyond the image's in-plane edge (a contour drawn along the border);
# farther is refused, not clipped: a contour off the image was drawn on another image
OUTSIDE_TOLERANCE_VOXELS = 1.0


def roi_names(ds) -> dict[int, str]:
    """ROI number -> ROI name of an RTSTRUCT dataset. Raises ``ValueError`` for an item without
    a (numeric) ROI Number."""
    names = {}
    for n, item in enumerate(getattr(ds, "StructureSetROISequence", []), start=1):
        if "ROINumber" not in item:
            raise ValueError(f"Structure Set ROI Sequence item {n} has no ROI Number")
        names[int(item.ROINumber)] = str(getattr(item, "ROIName", ""))
    return names


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
    the grid's slices or outside the image (more than :data:`OUTSIDE_TOLERANCE_VOXELS` beyond its
    edge: the RTSTRUCT was drawn on another image, so nothing is clipped), and for malformed
    contours (ContourData not x, y, z triples, non-finite coordinates, a contour item naming no
    ROI)."""
    path = Path(path)
    pattern = compile_select(rois, path)
    ds = read_label_object(path, "RTSTRUCT", "an RTSTRUCT")
    try:
        names = roi_names(ds)
    except (TypeError, ValueError) as exc:
        raise InputFileError(path, f"malformed RTSTRUCT ({exc})") from None
    chosen = {n: name for n, name in names.items() if pattern is None or pattern.search(name)}
    if not chosen:
        raise InputFileError(path, f"no ROI name matches {rois!r} (ROIs: {sorted(names.values())})")
    mask = np.zeros(geometry.size, dtype=np.uint8)
    used: set[str] = set()
    for n, item in enumerate(getattr(ds, "ROIContourSequence", []), start=1):
        try:
            number = int(item.ReferencedROINumber)
        except (AttributeError, TypeError, ValueError):
            raise InputFileError(path, f"ROI Contour Sequence item {n} has no (numeric) Referenced ROI Number, so its "
                                       "contours belong to no ROI; the RTSTRUCT is damaged") from None  # fmt: skip
        if number not in chosen:
            continue
        roi = np.zeros(geometry.size, dtype=np.uint8)
        for c, contour in enumerate(getattr(item, "ContourSequence", [])):
            if str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue
            what = f"ROI {chosen[number]!r} contour {c + 1}"
            points = _contour_points(contour, path, what)
            if len(points) < 3:
                continue
            index = grid_index(geometry, points)
            k = int(np.rint(index[:, 2].mean()))
            if np.abs(index[:, 2] - k).max() > SLICE_TOLERANCE:
                raise InputFileError(path, f"{what} is not on one slice of the image "
                                           f"grid (slice index {index[:, 2].min():.2f}..{index[:, 2].max():.2f})")
            if not 0 <= k < geometry.size[2]:
                raise InputFileError(path, f"{what} lies outside the image "
                                           f"(slice {k} of {geometry.size[2]})")
            outside_mm = _in_plane_overshoot_mm(index, geometry)
            if outside_mm > 0:
                raise InputFileError(path, f"{what} reaches {outside_mm:.1f} mm outside the image in-plane "
                                           f"(slice {k}); nothing is clipped: an RTSTRUCT drawn on this series lies "
                                           "on its image, so check which series it belongs to, or leave the ROI out "
                                           "with --select")  # fmt: skip
            fill_polygon(roi[:, :, k], index[:, :2])
        if roi.any():
            used.add(chosen[number])
            mask |= roi
    if not used:
        log.warning("%s: the selected ROIs %s have no closed contour", path.name, sorted(chosen.values()))
    return mask, sorted(used)


def _contour_points(contour, path: Path, what: str) -> np.ndarray:
    """(N, 3) LPS points of a contour item; refuses ContourData that is not finite x, y, z triples."""
    data = getattr(contour, "ContourData", None)
    values = [] if data is None else (list(data) if not isinstance(data, (str, bytes, float, int)) else [data])
    try:
        flat = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputFileError(path, f"{what}: ContourData holds a value that is not a number") from None
    if flat.size % 3:
        raise InputFileError(path, f"{what}: ContourData holds {flat.size} value(s), not x, y, z triples "
                                   "(a multiple of 3); the RTSTRUCT is damaged")  # fmt: skip
    if not np.isfinite(flat).all():
        raise InputFileError(path, f"{what}: ContourData holds {int((~np.isfinite(flat)).sum())} non-finite "
                                   "value(s) (NaN or infinity); the RTSTRUCT is damaged")  # fmt: skip
    return flat.reshape(-1, 3)


def _in_plane_overshoot_mm(index: np.ndarray, geometry: Geometry) -> float:
    """How far (mm) the farthest point of a contour lies beyond the image's in-plane edge plus
    :data:`OUTSIDE_TOLERANCE_VOXELS`; 0 when every point is within it. The image spans voxel
    centres 0..n-1, its edge half a voxel further."""
    size = np.asarray(geometry.size[:2], dtype=np.float64)
    low = -0.5 - OUTSIDE_TOLERANCE_VOXELS
    high = size - 0.5 + OUTSIDE_TOLERANCE_VOXELS
    ij = index[:, :2]
    beyond = np.maximum(low - ij, 0.0) + np.maximum(ij - high, 0.0)
    if not beyond.any():
        return 0.0
    return float(np.linalg.norm(beyond * np.asarray(geometry.spacing[:2], dtype=np.float64), axis=1).max())
