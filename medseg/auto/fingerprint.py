"""Dataset fingerprint: what ``medseg plan`` measures on the cross-validation pool.

The fingerprint is computed from the labelled cases whose split is not ``test``
(:func:`medseg.auto.folds.cv_pool`); test cases are never read. Every case is read with the same
readers as training (``medseg.io.read_volume``, reoriented with ``to_ras``, label mapped with
``map_labels``), so all axis triples are in RAS order ``(R, A, S)`` (R = sagittal slices,
A = coronal, S = axial).

Per case (``fingerprint["cases"][i]``)
--------------------------------------
==========================  ========================================================================
key                         meaning
==========================  ========================================================================
shape, spacing              RAS-oriented grid: voxels and mm per voxel along (R, A, S)
modality, label_values      manifest modality; raw label values present (before mapping)
cropped_extent              voxels of the foreground bounding box along (R, A, S)
                            (``medseg.transforms.preprocessing.foreground_mask``: body / brain; the whole
                            grid when the mask is empty)
n_lesions                   3-D lesions (26-connectivity, ``medseg.stats.lesions.label_components``)
lesion_volumes_mm3          their volumes in mm^3
lesion_slice_fraction       share of axial (S) slices that hold lesion
intensity[channel]          ``{"foreground": stats, "lesion": stats}`` over the body foreground
                            and the lesion voxels; stats = ``p0.5, p50, p99.5, mean, std``
                            (``None`` when the region is empty)
==========================  ========================================================================

Dataset level
-------------
Medians over cases of ``spacing``, ``shape`` and ``cropped_extent`` (``*_median``); every
lesion's volume pooled into ``lesion_volume_mm3`` percentiles ``p5, p50, p95`` and ``n_lesions``;
``lesion_slice_fraction_median``; the union of ``label_values``; ``modality`` (mixed
modalities are an error), ``channels``, ``n_cases``, ``n_patients``. ``intensity[channel]``
holds the same stats pooled over cases: up to ``INTENSITY_SAMPLES`` voxels drawn per case and
region (all of them when fewer; a fixed seed, so the fingerprint is deterministic), so every
case weighs about equally, as nnU-Net's dataset fingerprint does.

Everything is JSON-safe (ints, floats, strings, lists, dicts, ``None``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medseg.auto.folds import cv_pool
from medseg.config import LabelConfig
from medseg.errors import MedsegError
from medseg.geometry import bounding_box, label_components, to_ras
from medseg.io import check_same_grid, read_volume
from medseg.labels import map_labels, present_values
from medseg.manifest import Case
from medseg.progress import progress_enabled

FINGERPRINT_VERSION = 1
PERCENTILES = (0.5, 50.0, 99.5)
LESION_VOLUME_PERCENTILES = (5.0, 50.0, 95.0)
INTENSITY_SAMPLES = 10_000
AXIAL = 2  # index of S in (R, A, S)


def _pkey(q: float) -> str:
    """Percentile key: 0.5 -> ``p0.5``, 50.0 -> ``p50``."""
    return f"p{q:g}"


def intensity_stats(values: np.ndarray) -> dict[str, float] | None:
    """``{p0.5, p50, p99.5, mean, std}`` of a 1-D array of intensities; ``None`` when empty."""
    if values.size == 0:
        return None
    values = np.asarray(values, dtype=np.float64)
    pct = np.percentile(values, PERCENTILES)
    stats = {_pkey(q): float(v) for q, v in zip(PERCENTILES, pct, strict=True)}
    stats["mean"] = float(values.mean())
    stats["std"] = float(values.std())
    return stats


def _sample(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if values.size <= INTENSITY_SAMPLES:
        return values
    return values[np.sort(rng.choice(values.size, INTENSITY_SAMPLES, replace=False))]


class _Pooled:
    """Per channel and region, the voxel samples of every case (for pooled percentiles)."""

    def __init__(self) -> None:
        self.samples: dict[str, dict[str, list[np.ndarray]]] = {}

    def add(self, channel: str, region: str, values: np.ndarray) -> None:
        self.samples.setdefault(channel, {"foreground": [], "lesion": []})[region].append(values.astype(np.float64))

    def stats(self) -> dict[str, dict[str, dict[str, float] | None]]:
        return {
            channel: {region: intensity_stats(np.concatenate(parts) if parts else np.empty(0)) for region, parts in by_region.items()}
            for channel, by_region in self.samples.items()
        }


def case_fingerprint(case: Case, labels: LabelConfig, pooled: _Pooled | None = None, seed: int = 0) -> dict[str, Any]:
    """Fingerprint of one labelled case (see the module docstring). Channels are read one
    after the other; ``pooled`` collects voxel samples for the dataset-level intensities."""
    if case.label is None:
        raise MedsegError(f"case {case.case_id}: no label file; the fingerprint needs labelled cases")
    raw = read_volume(case.label)
    label_values = present_values(raw.array)
    mask_ijk = map_labels(raw.array, labels, raw.path)
    mask, affine = to_ras(mask_ijk, raw.affine)
    mask = mask.astype(bool)
    spacing = [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)]
    voxel_mm3 = float(np.prod(spacing))

    images: list[np.ndarray] = []
    for channel in case.channels:
        volume = read_volume(case.images[channel])
        check_same_grid(volume, raw, f"case {case.case_id}, channel {channel}")
        images.append(to_ras(volume.array, volume.affine)[0])
    from medseg.transforms.preprocessing import foreground_mask

    foreground = foreground_mask(np.stack(images), case.modality)
    box = bounding_box(foreground)
    cropped = [int(n) for n in mask.shape] if box is None else [s.stop - s.start for s in box]

    rng = np.random.default_rng(seed)
    intensity: dict[str, dict[str, dict[str, float] | None]] = {}
    for channel, image in zip(case.channels, images, strict=True):
        regions = {"foreground": image[foreground], "lesion": image[mask]}
        intensity[channel] = {name: intensity_stats(values) for name, values in regions.items()}
        if pooled is not None:
            for name, values in regions.items():
                pooled.add(channel, name, _sample(values, rng))
    del images

    components, n_lesions = label_components(mask, connectivity=26)
    counts = np.bincount(components.ravel(), minlength=n_lesions + 1)[1:] if n_lesions else np.empty(0)
    lesion_slices = mask.any(axis=(0, 1))
    return {
        "case_id": case.case_id,
        "patient_id": case.patient_id,
        "split": case.split,
        "modality": case.modality,
        "shape": [int(n) for n in mask.shape],
        "spacing": spacing,
        "label_values": label_values,
        "cropped_extent": cropped,
        "n_lesions": int(n_lesions),
        "lesion_volumes_mm3": [float(c) * voxel_mm3 for c in counts],
        "lesion_slice_fraction": float(lesion_slices.mean()),
        "intensity": intensity,
    }


def _median_triple(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(v) for v in np.median(np.asarray([r[key] for r in rows], dtype=np.float64), axis=0)]


def compute_fingerprint(cases: list[Case], labels: LabelConfig, progress: bool = True) -> dict[str, Any]:
    """Fingerprint of the cross-validation pool of ``cases`` (labelled, split not ``test``;
    the others are skipped unread). Raises ``MedsegError`` when the pool is empty or mixes
    modalities, and the readers' errors (``InputFileError`` naming the file) for a bad case."""
    pool = cv_pool(cases)
    if not pool:
        raise MedsegError("no labelled case outside the test split: the fingerprint needs at least one")
    modalities = sorted({c.modality.upper() for c in pool})
    if len(modalities) > 1:
        per = {m: [c.case_id for c in pool if c.modality.upper() == m][:3] for m in modalities}
        raise MedsegError(f"the pool mixes modalities {per}; plan one modality at a time (one manifest each)")
    pooled = _Pooled()
    rows = [
        case_fingerprint(case, labels, pooled, seed=i)
        for i, case in enumerate(tqdm(pool, desc="fingerprint", unit="case", disable=not progress_enabled(progress)))
    ]
    volumes = np.asarray([v for r in rows for v in r["lesion_volumes_mm3"]], dtype=np.float64)
    lesion_volume = (
        {_pkey(q): float(v) for q, v in zip(LESION_VOLUME_PERCENTILES, np.percentile(volumes, LESION_VOLUME_PERCENTILES), strict=True)}
        if volumes.size
        else None
    )
    return {
        "version": FINGERPRINT_VERSION,
        "n_cases": len(rows),
        "n_patients": len({c.patient_id for c in pool}),
        "modality": modalities[0],
        "channels": list(pool[0].channels),
        "label_values": sorted({v for r in rows for v in r["label_values"]}),
        "spacing_median": _median_triple(rows, "spacing"),
        "shape_median": _median_triple(rows, "shape"),
        "cropped_extent_median": _median_triple(rows, "cropped_extent"),
        "n_lesions": int(volumes.size),
        "lesion_volume_mm3": lesion_volume,
        "lesion_slice_fraction_median": float(np.median([r["lesion_slice_fraction"] for r in rows])),
        "intensity": pooled.stats(),
        "cases": rows,
    }

