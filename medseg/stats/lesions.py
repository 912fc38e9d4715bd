"""Per-slice and per-case lesion statistics, and the lesion-distribution curve.

Inputs are RAS-oriented arrays with axes (R, A, S) (see ``medseg.transforms.loading``); ``axis``
is 0 (sagittal slices), 1 (coronal) or 2 (axial). Slice index 0 is the most left /
posterior / inferior slice.

Definitions
-----------
- 2-D lesion components: connected components inside one slice (8- or 4-connectivity).
- 3-D lesions: connected components of the volume (26-, 18- or 6-connectivity).
- Largest lesion diameter: the longest distance between two points of one 3-D lesion,
  measured between the outer corners of its voxels (the physical extent, as pyradiomics'
  Maximum3DDiameter does on its mesh), in mm.
- Normalised position: (slice - first) / (last - first) over the case's extent (first/last
  slice holding foreground, or the whole volume).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cc3d
import numpy as np
import pandas as pd

from medseg.geometry import bounding_box, components_per_slice, label_components, max_diameter_mm

CT_FOREGROUND_HU = -500.0


@dataclass
class CaseLesionStats:
    """Statistics of one case: ``slices`` has one row per slice, ``case`` one dict,
    ``lesion_volumes_ml`` the volume of each 3-D lesion (mL, in label order)."""

    slices: pd.DataFrame
    case: dict
    lesion_volumes_ml: np.ndarray = field(default_factory=lambda: np.zeros(0))


def foreground_extent(
    image: np.ndarray, axis: int, modality: str, threshold: float | None = None
) -> tuple[int, int, float]:
    """First and last slice along ``axis`` holding body/brain foreground, and the threshold used.

    ``image``: (R, A, S) intensities. Threshold: given, or -500 HU for CT, or for MR the
    Otsu threshold of a subsample. A slice belongs to the extent when at least
    max(10, 0.1%) of its pixels exceed the threshold. Falls back to the whole volume.
    (``case_lesion_stats`` further widens the extent to every slice holding lesion.)
    """
    if threshold is None:
        if modality.upper() == "CT":
            threshold = CT_FOREGROUND_HU
        else:
            from skimage.filters import threshold_otsu

            sample = np.asarray(image[::2, ::2, ::2], dtype=np.float32).ravel()
            lo, hi = np.percentile(sample, [0.5, 99.5])
            sample = np.clip(sample, lo, hi)
            threshold = float(threshold_otsu(sample)) if hi > lo else float(lo)
    others = tuple(a for a in range(3) if a != axis)
    counts = (image > threshold).sum(axis=others)
    slice_pixels = image.size // image.shape[axis]
    inside = np.flatnonzero(counts >= max(10, 0.001 * slice_pixels))
    if inside.size == 0:
        return 0, image.shape[axis] - 1, float(threshold)
    return int(inside[0]), int(inside[-1]), float(threshold)


def case_lesion_stats(
    mask: np.ndarray,
    spacing: tuple[float, float, float],
    axis: int = 2,
    extent: tuple[int, int] | None = None,
    connectivity_2d: int = 8,
    connectivity_3d: int = 26,
    slice_positions_mm: np.ndarray | None = None,
) -> CaseLesionStats:
    """Per-slice and per-case statistics of a binary lesion mask.

    ``mask``: (R, A, S) bool/uint8; ``spacing``: mm per axis of ``mask``; ``extent``: first and
    last slice of the case's extent (default: the whole volume); ``slice_positions_mm``:
    world coordinate of each slice centre along ``axis`` (optional column).
    """
    mask = np.asarray(mask)
    mask = mask.view(bool) if mask.dtype == np.uint8 else mask.astype(bool, copy=False)
    n_slices = mask.shape[axis]
    others = tuple(a for a in range(3) if a != axis)
    pixel_area = float(np.prod([spacing[a] for a in others]))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    slice_pixels = int(np.prod([mask.shape[a] for a in others]))

    voxels_per_slice = np.zeros(n_slices, dtype=np.int64)
    comps_per_slice = np.zeros(n_slices, dtype=np.int64)
    n_lesions = 0
    largest_diam = 0.0
    largest_ml = 0.0
    volumes_ml = np.zeros(0)
    box = bounding_box(mask)
    if box is not None:
        crop = np.ascontiguousarray(mask[box])  # labelling a strided view is ~2x slower
        voxels_per_slice[box[axis]] = crop.sum(axis=others)
        comps_per_slice[box[axis]] = components_per_slice(crop, axis, connectivity_2d)
        labels_3d, n_lesions = label_components(crop, connectivity_3d)
        if n_lesions:
            info = cc3d.statistics(labels_3d, no_slice_conversion=False)
            volumes_ml = info["voxel_counts"][1:].astype(np.float64) * voxel_ml
            largest_ml = float(volumes_ml.max())
            # a lesion's diameter is at most its bounding-box diagonal: visit lesions by that
            # bound, largest first, and stop once no remaining lesion can beat the maximum
            boxes = info["bounding_boxes"][1:]
            bounds = [float(np.linalg.norm([(b.stop - b.start) * s for b, s in zip(box, spacing, strict=True)])) for box in boxes]
            for index in np.argsort(bounds)[::-1]:
                if bounds[index] <= largest_diam:
                    break
                sl = boxes[index]
                largest_diam = max(largest_diam, max_diameter_mm(labels_3d[sl] == index + 1, spacing))

    first, last = extent if extent is not None else (0, n_slices - 1)
    with_lesion = np.flatnonzero(voxels_per_slice)
    outside = int(np.count_nonzero((with_lesion < first) | (with_lesion > last)))
    if with_lesion.size:  # a lesion implies foreground: the extent always covers it
        first, last = min(first, int(with_lesion[0])), max(last, int(with_lesion[-1]))
    span = max(last - first, 1)
    slice_index = np.arange(n_slices)
    in_extent = (slice_index >= first) & (slice_index <= last)
    norm = np.where(in_extent, (slice_index - first) / span, np.nan)
    slices = pd.DataFrame(
        {
            "slice": slice_index,
            "position_mm": slice_positions_mm if slice_positions_mm is not None else np.full(n_slices, np.nan),
            "norm_position": norm,
            "in_extent": in_extent,
            "lesion_voxels": voxels_per_slice,
            "lesion_area_mm2": voxels_per_slice * pixel_area,
            "n_components_2d": comps_per_slice,
            "lesion_fraction": voxels_per_slice / slice_pixels,
        }
    )
    case = {
        "n_slices": n_slices,
        "extent_first": first,
        "extent_last": last,
        "n_lesions_3d": int(n_lesions),
        "lesion_voxels": int(voxels_per_slice.sum()),
        "lesion_volume_ml": float(voxels_per_slice.sum()) * voxel_ml,
        "slices_with_lesion": int(with_lesion.size),
        "first_lesion_slice": int(with_lesion[0]) if with_lesion.size else -1,
        "last_lesion_slice": int(with_lesion[-1]) if with_lesion.size else -1,
        "lesion_slices_outside_foreground": outside,
        "largest_lesion_volume_ml": largest_ml,
        "largest_lesion_diameter_mm": largest_diam,
        "spacing_r": float(spacing[0]),
        "spacing_a": float(spacing[1]),
        "spacing_s": float(spacing[2]),
    }
    return CaseLesionStats(slices=slices, case=case, lesion_volumes_ml=volumes_ml)


def case_curve(slices: pd.DataFrame, grid: np.ndarray, value: str = "lesion_area_mm2") -> tuple[np.ndarray, np.ndarray]:
    """Resample one case's per-slice ``value`` onto normalised positions ``grid`` (in [0, 1]).

    Returns (values on grid by linear interpolation, has-lesion on grid by nearest slice).
    Slices outside the extent are ignored.
    """
    inside = slices[slices["in_extent"]]
    pos = inside["norm_position"].to_numpy(dtype=np.float64)
    val = inside[value].to_numpy(dtype=np.float64)
    if len(pos) == 1:
        return np.full(grid.shape, val[0]), np.full(grid.shape, val[0] > 0)
    curve = np.interp(grid, pos, val)
    nearest = np.clip(np.searchsorted(pos, grid), 0, len(pos) - 1)
    left = np.clip(nearest - 1, 0, len(pos) - 1)
    pick = np.where(np.abs(pos[left] - grid) <= np.abs(pos[nearest] - grid), left, nearest)
    return curve, val[pick] > 0


def lesion_distribution_curve(
    slice_stats: pd.DataFrame, n_bins: int = 101, value: str = "lesion_area_mm2"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Aggregate per-slice statistics of many cases into the lesion-distribution curve.

    ``slice_stats``: rows of ``case_lesion_stats(...).slices`` with a ``case_id`` column.
    Returns (aggregate, per_case): aggregate has one row per normalised position with
    mean, median, q25, q75 of ``value`` over cases and ``share_with_lesion`` (fraction of
    cases with lesion at that position); per_case has columns case_id, position, value.
    """
    grid = np.linspace(0.0, 1.0, n_bins)
    curves, flags, ids = [], [], []
    for case_id, group in slice_stats.groupby("case_id", sort=False):
        curve, has = case_curve(group, grid, value)
        curves.append(curve)
        flags.append(has)
        ids.append(case_id)
    if not curves:
        empty = pd.DataFrame(columns=["position", "n_cases", "mean", "median", "q25", "q75", "share_with_lesion"])
        return empty, pd.DataFrame(columns=["case_id", "position", value])
    stack = np.vstack(curves)
    aggregate = pd.DataFrame(
        {
            "position": grid,
            "n_cases": len(curves),
            "mean": stack.mean(axis=0),
            "median": np.median(stack, axis=0),
            "q25": np.percentile(stack, 25, axis=0),
            "q75": np.percentile(stack, 75, axis=0),
            "share_with_lesion": np.vstack(flags).mean(axis=0),
        }
    )
    per_case = pd.DataFrame(
        {
            "case_id": np.repeat(ids, len(grid)),
            "position": np.tile(grid, len(ids)),
            value: stack.ravel(),
        }
    )
    return aggregate, per_case
