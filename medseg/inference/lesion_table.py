"""3-D lesion instances of a predicted mask and their table (:func:`medseg.outputs.lesion_table_file`).

Everything is measured on the **source grid** (I, J, K) of the input image, the grid the mask
is written on. World coordinates are scanner millimetres in **RAS** (nibabel's convention, the
``affine`` of :class:`medseg.io.Volume`): +x towards the patient's Right, +y Anterior, +z
Superior. DICOM/ITK scanner coordinates are LPS: ``x_lps = -x_ras``, ``y_lps = -y_ras``,
``z_lps = z_ras``.

Columns (one row per lesion, ``lesion_id`` = the value in the instance map):

=========================  ==================================================================
lesion_id                  1..N, in raster order of the (I, J, K) array (cc3d labelling)
class                      most frequent predicted class in the lesion (1 for binary models)
voxels, volume_ml          size; mL = voxels x voxel volume / 1000
score_mean, score_max      mean and max lesion probability inside the lesion
centroid_i/j/k             centroid in voxel indices of the source grid
centroid_x/y/z_ras_mm      the same point in RAS world millimetres (scanner coordinates)
bbox_i_min ... bbox_k_max  bounding box, inclusive voxel indices
max_inplane_diameter_mm    longest distance between pixel corners of the lesion within one
                           slice normal to the slicing axis (RECIST-like), over all slices
=========================  ==================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cc3d
import numpy as np
import pandas as pd
from scipy.spatial.distance import pdist

from medseg.lesions import bounding_box, hull_vertices

LESION_COLUMNS = (
    "lesion_id", "class", "voxels", "volume_ml", "score_mean", "score_max",
    "centroid_i", "centroid_j", "centroid_k", "centroid_x_ras_mm", "centroid_y_ras_mm", "centroid_z_ras_mm",
    "bbox_i_min", "bbox_i_max", "bbox_j_min", "bbox_j_max", "bbox_k_min", "bbox_k_max",
    "max_inplane_diameter_mm",
)  # fmt: skip
CORNERS_2D = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])


def source_slice_axis(affine: np.ndarray, ras_axis: int) -> int:
    """Index axis (0, 1, 2 = I, J, K) of a grid that ``Orientation("RAS")`` maps to ``ras_axis``."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(np.asarray(affine, dtype=np.float64))
    return int(np.flatnonzero(ornt[:, 0] == ras_axis)[0])


def inplane_diameter_mm(pixels: np.ndarray, spacing: Sequence[float]) -> float:
    """Longest corner-to-corner distance (mm) of a 2-D pixel set.

    ``pixels``: (N, 2) integer indices; ``spacing``: mm along the two axes (an orthogonal grid).
    The farthest corner pair lies on the convex hull of the pixel centres' corners.
    """
    scale = np.asarray(spacing, dtype=np.float64)
    centres = hull_vertices(pixels.astype(np.float64))
    corners = hull_vertices(((centres[:, None, :] + CORNERS_2D[None]) * scale).reshape(-1, 2))
    return float(pdist(corners).max()) if len(corners) > 1 else 0.0


def _max_inplane_diameter(component: np.ndarray, axis: int, spacing: Sequence[float]) -> float:
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


def _scores(labels: np.ndarray, n: int, prob: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and max of ``prob`` per lesion, from the lesion voxels only (scipy's
    ``ndimage.maximum`` argsorts the whole volume: 0.6 s on a BraTS case)."""
    inside = labels > 0
    ids = labels[inside]
    values = np.asarray(prob)[inside].astype(np.float64, copy=False)
    means = np.bincount(ids, weights=values, minlength=n + 1)[1:] / np.maximum(counts, 1)
    order = np.argsort(ids, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    maxes = np.maximum.reduceat(values[order], starts)
    return means, maxes


def lesion_table(
    labels: np.ndarray,
    n: int,
    lesion_prob: np.ndarray | None,
    affine: np.ndarray,
    spacing: Sequence[float],
    slice_axis: int,
    classes: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per lesion of ``labels`` (columns: module docstring, ``LESION_COLUMNS``).

    ``labels``: (I, J, K) instance ids 0..n; ``lesion_prob``: (I, J, K) lesion probability or
    None (scores NaN); ``affine``: 4x4 RAS; ``spacing``: mm along I, J, K; ``slice_axis``: index
    axis normal to the slices (see ``source_slice_axis``); ``classes``: (I, J, K) uint8 predicted
    classes (None: class 1 for every lesion).
    """
    if n == 0:
        return pd.DataFrame({c: pd.Series(dtype=np.float64 if "mm" in c or "score" in c or c == "volume_ml" else np.int64)
                             for c in LESION_COLUMNS})
    outer = bounding_box(labels)  # every measure is taken inside the lesions' bounding box
    assert outer is not None, "n > 0 but labels are empty"
    origin = np.array([sl.start for sl in outer])
    labels = np.ascontiguousarray(labels[outer])
    stats = cc3d.statistics(labels, no_slice_conversion=False)
    counts = np.asarray(stats["voxel_counts"][1 : n + 1], dtype=np.int64)
    centroids = np.asarray(stats["centroids"][1 : n + 1], dtype=np.float64) + origin
    boxes = stats["bounding_boxes"][1 : n + 1]
    ids = np.arange(1, n + 1)
    if lesion_prob is not None:
        score_mean, score_max = _scores(labels, n, np.asarray(lesion_prob)[outer], counts)
    else:
        score_mean = score_max = np.full(n, np.nan)
    if classes is not None:
        classes = np.asarray(classes)[outer]
        cls = np.empty(n, dtype=np.int64)
        for index, box in enumerate(boxes, start=1):
            values = classes[box][labels[box] == index]
            cls[index - 1] = int(np.bincount(values).argmax())
    else:
        cls = np.ones(n, dtype=np.int64)
    world = (np.asarray(affine, dtype=np.float64) @ np.c_[centroids, np.ones(n)].T).T[:, :3]
    diameters = np.array(
        [_max_inplane_diameter(labels[box] == index, slice_axis, spacing) for index, box in enumerate(boxes, start=1)]
    )
    voxel_ml = float(np.prod(spacing)) / 1000.0
    table = {
        "lesion_id": ids,
        "class": cls,
        "voxels": counts,
        "volume_ml": counts * voxel_ml,
        "score_mean": score_mean,
        "score_max": score_max,
        "centroid_i": centroids[:, 0],
        "centroid_j": centroids[:, 1],
        "centroid_k": centroids[:, 2],
        "centroid_x_ras_mm": world[:, 0],
        "centroid_y_ras_mm": world[:, 1],
        "centroid_z_ras_mm": world[:, 2],
    }
    for axis, name in enumerate("ijk"):
        table[f"bbox_{name}_min"] = np.array([b[axis].start for b in boxes], dtype=np.int64) + origin[axis]
        table[f"bbox_{name}_max"] = np.array([b[axis].stop - 1 for b in boxes], dtype=np.int64) + origin[axis]
    table["max_inplane_diameter_mm"] = diameters
    return pd.DataFrame(table, columns=list(LESION_COLUMNS))
