"""The DICOM instances of an image series, each placed on medseg's voxel grid.

medseg's volumes are (I, J, K) arrays on an ITK grid (:class:`medseg.io.Geometry`: LPS origin,
direction columns = index axes). A single-frame DICOM instance is one K slice: its Image
Position (Patient) is the world position of voxel (0, 0, k), its Image Orientation (Patient)
holds the row direction (= I axis, along a row, column index grows) and the column direction
(= J axis), and its pixel array is (rows, columns) = (J, I). :func:`place_instances` finds k for
every instance from its position -- never from file order or InstanceNumber, which scanners fill
in any order -- and refuses an instance that does not lie exactly on the grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError
from medseg.io import Geometry, dicom_series_headers

# a position may be off the grid by this many voxels (DS values are decimal strings of <= 16
# characters: ~1e-5 mm rounding on a 0.5 mm grid is 2e-5 voxels)
GRID_TOLERANCE_VOXELS = 1e-3
ORIENTATION_TOLERANCE = 1e-4


@dataclass
class PlacedInstance:
    """One source instance: its slice index ``k`` on the grid and its dataset (no pixel data)."""

    k: int
    dataset: object  # pydicom.Dataset
    path: Path


def grid_index(geometry: Geometry, points_lps: np.ndarray) -> np.ndarray:
    """(N, 3) LPS world points (mm) -> (N, 3) continuous (i, j, k) indices of ``geometry``."""
    matrix = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3) * np.asarray(geometry.spacing)
    offset = np.asarray(points_lps, dtype=np.float64) - np.asarray(geometry.origin)
    return np.linalg.solve(matrix, offset.T).T


def orientation_problem(geometry: Geometry, orientation: Sequence[float]) -> str | None:
    """Why a plane with Image Orientation (Patient) ``orientation`` (row then column direction
    cosines) is not an (I, J) plane of ``geometry``; None when it is."""
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    row, col = np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:6], dtype=np.float64)
    if np.abs(row - direction[:, 0]).max() > ORIENTATION_TOLERANCE or np.abs(col - direction[:, 1]).max() > ORIENTATION_TOLERANCE:
        return (f"orientation {[round(float(v), 5) for v in orientation]} is not the grid's "
                f"{[round(float(v), 5) for v in (*direction[:, 0], *direction[:, 1])]}")
    return None


def integer_index(continuous: np.ndarray) -> np.ndarray | None:
    """Rounded indices when every value is within :data:`GRID_TOLERANCE_VOXELS` of an integer."""
    rounded = np.rint(continuous)
    if np.abs(continuous - rounded).max() > GRID_TOLERANCE_VOXELS:
        return None
    return rounded.astype(np.int64)


def read_series_instances(folder: str | Path) -> list[tuple[Path, object]]:
    """(path, dataset without pixel data) for every file of the series medseg reads from
    ``folder`` (:func:`medseg.io.dicom_series_files`; its slice geometry is checked when the
    series is read as a volume, :func:`medseg.io.dicom_slice_spacing`)."""
    return dicom_series_headers(folder)


def place_instances(folder: str | Path, geometry: Geometry) -> list[PlacedInstance]:
    """The series' instances with their slice index on ``geometry`` (the grid medseg read the
    series onto), in k order. Raises ``InputFileError`` (naming the file) for an instance that
    is not a plain (I, J) slice of the grid or when a slice has no instance or two."""
    placed: list[PlacedInstance] = []
    size = geometry.size
    for path, ds in read_series_instances(folder):
        orientation = getattr(ds, "ImageOrientationPatient", None)
        position = getattr(ds, "ImagePositionPatient", None)
        if orientation is None or position is None:
            raise InputFileError(path, "DICOM instance has no Image Position/Orientation (Patient); cannot place it")
        problem = orientation_problem(geometry, [float(v) for v in orientation])
        if problem:
            raise InputFileError(path, f"instance is not a slice of the series grid: {problem}")
        if (int(ds.Rows), int(ds.Columns)) != (size[1], size[0]):
            raise InputFileError(path, f"instance is {ds.Rows} x {ds.Columns} pixels, the grid {size[1]} x {size[0]}")
        index = integer_index(grid_index(geometry, np.asarray([[float(v) for v in position]]))[0])
        if index is None or index[0] != 0 or index[1] != 0 or not 0 <= index[2] < size[2]:
            raise InputFileError(path, f"Image Position (Patient) {list(map(float, position))} is not a slice "
                                       "position of the series grid")
        placed.append(PlacedInstance(int(index[2]), ds, path))
    placed.sort(key=lambda p: p.k)
    ks = [p.k for p in placed]
    if ks != list(range(size[2])):
        missing = sorted(set(range(size[2])) - set(ks))
        doubled = sorted({k for k in ks if ks.count(k) > 1})
        raise InputFileError(folder, f"series instances do not cover the grid's {size[2]} slices once each "
                                     f"(missing {missing[:5]}, doubled {doubled[:5]})")
    return placed
