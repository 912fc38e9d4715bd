"""RTSTRUCT contours -> mask on the image grid: known polygons give known voxels (axial and
oblique grids), holes and islands by the even-odd rule, off-slice contours refused."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_helpers import GEOMETRIES, write_rtstruct, write_series

from medseg.dicom.rtstruct import read_rtstruct
from medseg.errors import InputFileError
from medseg.io import Geometry, read_volume

pytest.importorskip("pydicom")

SHAPE = (24, 20, 8)


def series(tmp_path, kind: str, rng):
    geometry = Geometry(SHAPE, (0.8, 0.6, 3.0), (-12.3, 40.1, -7.5), tuple(GEOMETRIES[kind].ravel()))
    folder = tmp_path / "series"
    write_series(folder, (rng.random(SHAPE) * 100).astype(np.int16), geometry, order="shuffled")
    return folder, read_volume(folder).geometry


def world(geometry: Geometry, ijk: np.ndarray) -> np.ndarray:
    """(N, 3) continuous indices -> (N, 3) LPS points."""
    matrix = np.asarray(geometry.direction).reshape(3, 3) * np.asarray(geometry.spacing)
    return np.asarray(geometry.origin) + np.asarray(ijk, dtype=float) @ matrix.T


def rectangle(geometry, i0, i1, j0, j1, k) -> np.ndarray:
    """Contour along the voxel edges of the block i0..i1-1, j0..j1-1 on slice k."""
    corners = np.array([[i0 - 0.5, j0 - 0.5, k], [i1 - 0.5, j0 - 0.5, k], [i1 - 0.5, j1 - 0.5, k], [i0 - 0.5, j1 - 0.5, k]])
    return world(geometry, corners)


@pytest.mark.parametrize("kind", ["axial", "oblique", "axial_k_to_feet"])
def test_rectangles_hole_and_islands_land_on_their_voxels(tmp_path, rng, kind):
    folder, geometry = series(tmp_path, kind, rng)
    rt = write_rtstruct(tmp_path / "rt.dcm", folder, {
        "GTV": [rectangle(geometry, 4, 12, 3, 9, 2),  # a block on slice 2
                rectangle(geometry, 2, 16, 2, 16, 5), rectangle(geometry, 6, 10, 6, 10, 5),  # a ring (hole) on slice 5
                rectangle(geometry, 18, 22, 14, 18, 5)],  # and an island beside it
        "Body": [rectangle(geometry, 0, 24, 0, 20, 3)],
    })
    expected = np.zeros(SHAPE, np.uint8)
    expected[4:12, 3:9, 2] = 1
    expected[2:16, 2:16, 5] = 1
    expected[6:10, 6:10, 5] = 0
    expected[18:22, 14:18, 5] = 1
    mask, used = read_rtstruct(rt, geometry, rois="gtv")
    np.testing.assert_array_equal(mask, expected)
    assert used == ["GTV"]
    everything, used = read_rtstruct(rt, geometry)
    assert used == ["Body", "GTV"] and everything[:, :, 3].all() and everything.sum() == expected.sum() + 24 * 20


def test_polygon_fills_voxel_centres_inside(tmp_path, rng):
    """A triangle: exactly the voxels whose centres lie inside it."""
    folder, geometry = series(tmp_path, "oblique", rng)
    tri = np.array([[2.2, 1.7, 4], [20.6, 3.1, 4], [8.4, 17.9, 4]])
    rt = write_rtstruct(tmp_path / "rt.dcm", folder, {"lesion": [world(geometry, tri)]})
    mask, _ = read_rtstruct(rt, geometry)
    from matplotlib.path import Path as MplPath

    ii, jj = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    inside = MplPath(tri[:, :2]).contains_points(np.c_[ii.ravel(), jj.ravel()]).reshape(SHAPE[:2])
    assert mask[:, :, 4].sum() > 60
    assert (mask[:, :, 4] != inside).sum() <= 2  # boundary voxel centres may go either way
    assert mask[:, :, [0, 1, 2, 3, 5, 6, 7]].sum() == 0


def test_contour_between_slices_is_refused(tmp_path, rng):
    folder, geometry = series(tmp_path, "axial", rng)
    rt = write_rtstruct(tmp_path / "rt.dcm", folder, {"GTV": [rectangle(geometry, 4, 12, 3, 9, 2.5)]})
    with pytest.raises(InputFileError, match="not on one slice"):
        read_rtstruct(rt, geometry)
    with pytest.raises(InputFileError, match="no ROI name matches"):
        read_rtstruct(rt, geometry, rois="liver")
