"""Geometry primitives: axis names and maps, RAS views, grid checks, bounding boxes, 3-D and
per-slice connected components, lesion diameters. One owner for each; statistics
(:mod:`medseg.stats.lesions`), metrics, inference and transforms import them from here.

Axis conventions: an array read from a file is (I, J, K) in index order; its 4x4 ``affine`` maps
voxel indices to RAS millimetres (nibabel's convention; ITK files are LPS on disk and converted on
reading, ``LPS_TO_RAS``). :func:`to_ras` gives the (R, A, S) view used for statistics and slicing;
:data:`AXIS_INDEX` names the RAS axis each slice plane is normal to (sagittal R = 0, coronal A =
1, axial S = 2) and :func:`slice_axis` finds the matching index axis of an (I, J, K) grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import cc3d
import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

AxisName = Literal["axial", "coronal", "sagittal"]
# RAS axis each slicing direction is perpendicular to; also the spatial axis of an (R, A, S) array
AXIS_INDEX: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
AFFINE_ATOL = 1e-4  # mm: two affines closer than this describe one voxel grid
CORNERS_2D = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])


# --------------------------------------------------------------------------- axes


def index_axis(affine: np.ndarray, ras_axis: int) -> int:
    """Index axis (0, 1, 2 = I, J, K) of a grid with this 4x4 voxel-to-RAS ``affine`` that
    ``Orientation("RAS")`` maps to RAS axis ``ras_axis`` (the nearest world axis of each index
    axis, as ``nibabel.orientations.io_orientation`` finds it; oblique grids are not resampled)."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(np.asarray(affine, dtype=np.float64))
    hits = np.flatnonzero(ornt[:, 0] == ras_axis)
    if hits.size != 1:
        raise ValueError(f"cannot find the index axis along RAS axis {ras_axis} of affine\n{affine}")
    return int(hits[0])


def slice_axis(affine: np.ndarray, name: AxisName = "axial") -> int:
    """Index axis of a volume with this 4x4 voxel-to-RAS ``affine`` that runs along the normal
    of ``name`` slices (axial: S, coronal: A, sagittal: R): :func:`index_axis` of its RAS axis."""
    return index_axis(affine, AXIS_INDEX[name])


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient an (I, J, K) array to the closest RAS axes (R, A, S) without copying.

    Only axis permutations and flips (views), as MONAI's ``Orientation("RAS")`` does; oblique
    grids keep their obliquity in the returned affine. Returns (array view, new RAS affine).
    """
    import nibabel.orientations as nio

    ornt = nio.io_orientation(affine)
    array_ras = nio.apply_orientation(array, ornt)
    affine_ras = affine @ nio.inv_ornt_aff(ornt, array.shape)
    return array_ras, affine_ras


# --------------------------------------------------------------------------- grids


def grid_mismatch(shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int], affine_b: np.ndarray) -> str | None:
    """Why two (shape, affine) grids differ -- shape, or affine beyond ``AFFINE_ATOL`` -- or None."""
    if tuple(shape_a) != tuple(shape_b):
        return f"shape {tuple(shape_a)} vs {tuple(shape_b)}"
    a, b = np.asarray(affine_a, dtype=np.float64), np.asarray(affine_b, dtype=np.float64)
    if not np.allclose(a, b, atol=AFFINE_ATOL):
        return f"different affines (max difference {float(np.abs(a - b).max()):.4g} mm)"
    return None


def reindex_onto(
    array: np.ndarray, affine: np.ndarray, target_shape: Sequence[int], target_affine: np.ndarray, atol: float = 1e-3
) -> np.ndarray | None:
    """``array`` (on ``affine``) re-indexed onto the grid (``target_shape``, ``target_affine``)
    when both grids hold the same voxels in another axis order or direction (a signed axis
    permutation: e.g. a mask saved in RAS order for an LPS series). Exact: no interpolation.
    None when the grids' voxels do not coincide one to one (other spacing, shift, oblique)."""
    index_map = np.linalg.inv(np.asarray(target_affine, dtype=np.float64)) @ np.asarray(affine, dtype=np.float64)
    linear, offset = index_map[:3, :3], index_map[:3, 3]
    rounded = np.rint(linear)
    if np.abs(linear - rounded).max() > atol or np.abs(offset - np.rint(offset)).max() > atol:
        return None
    if not (np.abs(rounded).sum(axis=0) == 1).all() or not (np.abs(rounded).sum(axis=1) == 1).all():
        return None
    order = [int(np.flatnonzero(rounded[t])[0]) for t in range(3)]  # target axis t <- source axis order[t]
    out = np.transpose(array, order)
    if tuple(out.shape) != tuple(int(s) for s in target_shape):
        return None
    for t in range(3):
        sign, start = rounded[t, order[t]], int(np.rint(offset[t]))
        if sign < 0:
            if start != out.shape[t] - 1:
                return None
            out = np.flip(out, axis=t)
        elif start != 0:
            return None
    return np.ascontiguousarray(out)


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every non-zero voxel of ``mask``, grown by ``margin``
    voxels and clipped to the array; ``None`` for an empty mask.

    Each axis is reduced on the box found so far, so a mostly empty volume is scanned about
    once in full rather than once per axis.
    """
    box = [slice(0, n) for n in mask.shape]
    for ax in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != ax)
        nz = np.flatnonzero(mask[tuple(box)].any(axis=others))
        if nz.size == 0:
            return None
        start = box[ax].start
        box[ax] = slice(start + int(nz[0]), start + int(nz[-1]) + 1)
    if margin:
        box = [slice(max(b.start - margin, 0), min(b.stop + margin, n)) for b, n in zip(box, mask.shape, strict=True)]
    return tuple(box)


# --------------------------------------------------------------------------- components


def structure_3d(connectivity: int) -> np.ndarray:
    """26 -> full 3x3x3, 18 -> faces+edges, 6 -> faces."""
    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    return ndimage.generate_binary_structure(3, rank)


def components_per_slice(mask: np.ndarray, axis: int, connectivity: int) -> np.ndarray:
    """Number of in-plane connected components on each slice normal to ``axis``.

    All slices are labelled in one 2-D call: they are stacked along one in-plane axis with an
    empty row between neighbours (so nothing connects across slices). Labels are assigned in
    raster order, so slice z owns a contiguous block of labels and its count is the growth of
    the running maximum label. ``mask``: bool (I, J, K); returns int64 (mask.shape[axis],).
    """
    slices_first = np.moveaxis(mask, axis, 0)
    n, h, w = slices_first.shape
    stacked = np.zeros((n, h + 1, w), dtype=bool)
    stacked[:, :h, :] = slices_first
    labels, _ = ndimage.label(stacked.reshape(n * (h + 1), w), structure=ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1))
    running = np.maximum.accumulate(labels.reshape(n, -1).max(axis=1))
    return np.diff(running, prepend=0).astype(np.int64)


def consecutive_labels(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids (any non-negative integers, 0 background) -> (labels int32 1..n in raster
    order of each id's first voxel, as connected-component labelling numbers them; the old id of
    each new label, (n,)). Lesion ``k`` of the result is old id ``old[k - 1]``."""
    flat = np.asarray(ids).ravel()
    present, first = np.unique(flat, return_index=True)
    keep = present > 0
    old = present[keep][np.argsort(first[keep], kind="stable")]
    if old.size == 0:
        return np.zeros(np.shape(ids), dtype=np.int32), old.astype(np.int64)
    lookup = np.zeros(int(old.max()) + 1, dtype=np.int32)
    lookup[old] = np.arange(1, old.size + 1, dtype=np.int32)
    return lookup[np.asarray(ids)], old.astype(np.int64)


CONNECTIVITIES = {3: (6, 18, 26), 2: (4, 8)}  # by array dimension: faces (+ edges (+ corners))


def label_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """3-D connected components of ``mask > 0``: (labels, N), lesions 1..N in raster order.

    ``mask``: a 3-D array in any fixed axis order; ``connectivity``: 6 (faces), 18 (+ edges) or
    26 (+ corners). Labels are uint16 (uint32 above 65535 components), the shape of ``mask``.
    Only the mask's bounding box is labelled (same components, same order, several times
    faster on lesion-sized boxes), by :func:`label_foreground`. The one labelling function of
    medseg: statistics, evaluation and the inference lesion tables all call it; code that
    already holds the bounding box (post-processing) calls :func:`label_foreground`.
    """
    if connectivity not in CONNECTIVITIES[3]:
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"lesion labelling expects a 3-D mask, got shape {mask.shape}")
    box = bounding_box(mask)
    if box is None:
        return np.zeros(mask.shape, np.uint16), 0
    crop, n = label_foreground(np.ascontiguousarray(mask[box] > 0), connectivity)
    labels = np.zeros(mask.shape, np.uint16 if n < 1 << 16 else np.uint32)
    labels[box] = crop
    return labels, n


def label_foreground(foreground: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Connected components of a boolean array as it is (no bounding box taken: the caller's
    array is already cropped to it): (labels, N), components 1..N in raster order, labels the
    shape of ``foreground`` in cc3d's unsigned type.

    ``foreground``: C-contiguous bool, 3-D (``connectivity`` 6, 18 or 26) or 2-D (4 or 8). Uses
    connected-components-3d (3-4x faster than ``scipy.ndimage.label`` on CT-sized masks).
    """
    allowed = CONNECTIVITIES.get(foreground.ndim, ())
    if connectivity not in allowed:
        raise ValueError(f"connectivity of a {foreground.ndim}-D array must be one of {allowed}, got {connectivity}")
    labels, n = cc3d.connected_components(foreground, connectivity=connectivity, return_N=True)
    return labels, int(n)


# --------------------------------------------------------------------------- diameters


def hull_vertices(points: np.ndarray, few: int = 8) -> np.ndarray:
    """Vertices of the convex hull of ``points`` (N, D); all points when N <= ``few`` or the
    set is degenerate (collinear / flat), so farthest-pair searches can run on the result."""
    if len(points) <= few:
        return points
    try:
        return points[ConvexHull(points).vertices]
    except QhullError:  # flat or collinear sets
        return points


def max_diameter_mm(component: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Longest corner-to-corner distance (mm) of a binary component (I, J, K) on an orthogonal grid.

    The farthest corner pair belongs to voxels whose centres are convex-hull vertices (the
    distance is convex in the centre difference), and every hull vertex is the first or last
    voxel of its line along K; so only those line ends, then their hull, then the corners of
    the hull's voxels are compared.
    """
    present = component.any(axis=2)
    if not present.any():
        return 0.0
    i, j = np.nonzero(present)
    lines = component[i, j, :]
    first = lines.argmax(axis=1)
    last = component.shape[2] - 1 - lines[:, ::-1].argmax(axis=1)
    ends = np.concatenate([np.stack([i, j, first], axis=1), np.stack([i, j, last], axis=1)]).astype(np.float64)
    centres = hull_vertices(ends * np.asarray(spacing))
    offsets = np.array([[dx, dy, dz] for dx in (-0.5, 0.5) for dy in (-0.5, 0.5) for dz in (-0.5, 0.5)]) * np.asarray(spacing)
    corners = hull_vertices((centres[:, None, :] + offsets[None, :, :]).reshape(-1, 3))
    if len(corners) > 20000:  # degenerate (flat) huge sets: subsample deterministically
        corners = corners[:: len(corners) // 20000 + 1]
    return float(pdist(corners).max()) if len(corners) > 1 else 0.0


def inplane_diameter_mm(pixels: np.ndarray, spacing: Sequence[float]) -> float:
    """Longest corner-to-corner distance (mm) of a 2-D pixel set.

    ``pixels``: (N, 2) integer indices; ``spacing``: mm along the two axes (an orthogonal grid).
    The farthest corner pair lies on the convex hull of the pixel centres' corners.
    """
    scale = np.asarray(spacing, dtype=np.float64)
    centres = hull_vertices(pixels.astype(np.float64))
    corners = hull_vertices(((centres[:, None, :] + CORNERS_2D[None]) * scale).reshape(-1, 2))
    return float(pdist(corners).max()) if len(corners) > 1 else 0.0


def max_inplane_diameter_mm(component: np.ndarray, axis: int, spacing: Sequence[float]) -> float:
    """Max over slices normal to ``axis`` of ``inplane_diameter_mm``; only the first and last
    pixel of each row can be hull vertices, so a slice contributes at most 2 x rows points.

    Slices are measured largest bounding box first; a slice whose box diagonal (corner to
    corner, an upper bound of its diameter) cannot beat the best so far is skipped, so a
    70-slice tumour needs a few hull computations instead of 70 (the same maximum)."""
    plane_spacing = [spacing[a] for a in range(3) if a != axis]
    moved = np.moveaxis(component, axis, 0)  # (S, H, W)
    present = moved.any(axis=2)  # (S, H)
    first = moved.argmax(axis=2)
    last = moved.shape[2] - 1 - moved[:, :, ::-1].argmax(axis=2)
    candidates = []  # (box diagonal, slice, its rows)
    for z in np.flatnonzero(present.any(axis=1)):
        rows = np.flatnonzero(present[z])
        height = (rows[-1] - rows[0] + 1) * plane_spacing[0]
        width = (last[z, rows].max() - first[z, rows].min() + 1) * plane_spacing[1]
        candidates.append((math.hypot(height, width), z, rows))
    best = 0.0
    for bound, z, rows in sorted(candidates, key=lambda c: c[0], reverse=True):
        if bound <= best:
            break
        ends = np.concatenate([np.stack([rows, first[z, rows]], axis=1), np.stack([rows, last[z, rows]], axis=1)])
        best = max(best, inplane_diameter_mm(ends, plane_spacing))
    return best
