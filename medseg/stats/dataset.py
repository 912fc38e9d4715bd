"""``medseg stats``: per-slice lesion statistics of every case of a manifest, and the curve.

Outputs (in ``out_dir``): ``slice_stats.csv``, ``case_stats.csv``, ``lesion_curve.csv``
(aggregate), ``lesion_curve_per_case.csv``, ``lesion_volumes.csv`` (one row per 3-D lesion:
case_id, lesion, volume_ml), ``lesion_curve.png``, ``failures.csv`` (cases that could not be
read, with the reason; the others are still processed) and the resolved config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medseg import atomic
from medseg.config import Config, dump_config
from medseg.errors import MedsegError
from medseg.geometry import AXIS_INDEX, to_ras
from medseg.io import check_same_grid, read_volume
from medseg.labels import read_label
from medseg.manifest import Case
from medseg.outputs import (
    CASE_STATS,
    FAILURES_FILE,
    LESION_CURVE,
    LESION_CURVE_PER_CASE,
    LESION_CURVE_PNG,
    LESION_VOLUMES,
    RUN_CONFIG,
    SLICE_STATS,
    mask_file,
)
from medseg.progress import progress_enabled
from medseg.stats.lesions import case_lesion_stats, foreground_extent, lesion_distribution_curve

log = logging.getLogger(__name__)

LESION_VOLUME_COLUMNS = ["case_id", "lesion", "volume_ml"]


@dataclass
class DatasetStats:
    slices: pd.DataFrame
    cases: pd.DataFrame
    curve: pd.DataFrame
    curve_per_case: pd.DataFrame
    failures: pd.DataFrame
    lesions: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=LESION_VOLUME_COLUMNS))


def slice_positions_mm(affine: np.ndarray, shape: tuple[int, int, int], axis: int) -> np.ndarray:
    """World (RAS, mm) coordinate along ``axis`` of each slice centre of an oriented grid."""
    n = shape[axis]
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    ijk = np.tile(centre, (n, 1))
    ijk[:, axis] = np.arange(n)
    world = ijk @ np.asarray(affine, dtype=np.float64)[:3, :3].T + np.asarray(affine)[:3, 3]
    return world[:, axis]


def stats_for_case(case: Case, cfg: Config) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """Load one case (label, plus its first channel when the extent is the foreground) and
    compute its statistics on the RAS-oriented grid: (per-slice rows, the case's row, one row
    per 3-D lesion with its volume)."""
    if case.label is None:
        raise MedsegError(f"case {case.case_id}: no label file, statistics need one")
    problem = case.check_files()  # a manifest read with check_files=False: a missing file fails this case only
    if problem is not None:
        raise MedsegError(problem)
    axis = AXIS_INDEX[cfg.stats.axis]
    use_image = cfg.stats.extent == "foreground"
    # Direct reads (no MONAI transform chain): reorientation by views keeps this within a
    # small factor of the bare file-read time (see benchmarks/bench_stats.py).
    label = read_label(case.label, cfg.data.labels)
    mask, affine = to_ras(label.array, label.affine)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    extent = None
    threshold = float("nan")
    if use_image:
        image = read_volume(case.images[case.channels[0]])
        check_same_grid(image, label, f"case {case.case_id}")
        image_ras, _ = to_ras(image.array, image.affine)
        first, last, threshold = foreground_extent(image_ras, axis, case.modality, cfg.stats.foreground_threshold)
        extent = (first, last)
    result = case_lesion_stats(
        mask,
        spacing,  # type: ignore[arg-type]
        axis=axis,
        extent=extent,
        connectivity_2d=cfg.stats.connectivity_2d,
        connectivity_3d=cfg.stats.connectivity_3d,
        slice_positions_mm=slice_positions_mm(affine, mask.shape, axis),
    )
    slices = result.slices
    slices.insert(0, "case_id", case.case_id)
    row = {
        "case_id": case.case_id,
        # outputs name the case only; the patient id is the manifest's to keep (stats.include_patient_id)
        **({"patient_id": case.patient_id} if cfg.stats.include_patient_id else {}),
        "modality": case.modality,
        "split": case.split,
        "axis": cfg.stats.axis,
        "extent_mode": cfg.stats.extent,
        "foreground_threshold": threshold,
        **result.case,
    }
    volumes = result.lesion_volumes_ml
    lesions = pd.DataFrame({"case_id": case.case_id, "lesion": np.arange(1, len(volumes) + 1), "volume_ml": volumes},
                           columns=LESION_VOLUME_COLUMNS)
    return slices, row, lesions


def _stats_or_failure(case: Case, cfg: Config) -> tuple[pd.DataFrame, dict, pd.DataFrame] | dict:
    try:
        return stats_for_case(case, cfg)
    except MedsegError as exc:
        log.warning("case %s failed: %s", case.case_id, exc)
        return {"case_id": case.case_id, "stage": "stats", "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a batch run records unexpected errors and goes on
        log.exception("case %s failed unexpectedly", case.case_id)
        return {"case_id": case.case_id, "stage": "stats", "error": f"{type(exc).__name__}: {exc}"}


def compute_dataset_stats(cases: list[Case], cfg: Config, progress: bool = True, workers: int = 2) -> DatasetStats:
    """Statistics of every labelled case; a failing case is recorded, not fatal.

    ``workers`` threads process cases concurrently (file decompression and the numpy/scipy
    kernels release the GIL), so reading one case overlaps computing another. Results keep
    the manifest order.
    """
    from concurrent.futures import ThreadPoolExecutor

    slice_frames: list[pd.DataFrame] = []
    rows: list[dict] = []
    lesion_frames: list[pd.DataFrame] = []
    failures: list[dict] = []
    labelled = [c for c in cases if c.label is not None]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda c: _stats_or_failure(c, cfg), labelled)
        for result in tqdm(results, total=len(labelled), desc="lesion statistics", unit="case",
                           disable=not progress_enabled(progress)):
            if isinstance(result, dict):
                failures.append(result)
                continue
            slices, row, lesions = result
            slice_frames.append(slices)
            rows.append(row)
            lesion_frames.append(lesions)
    slices_df = pd.concat(slice_frames, ignore_index=True) if slice_frames else pd.DataFrame()
    cases_df = pd.DataFrame(rows)
    if len(slices_df):
        curve, per_case = lesion_distribution_curve(slices_df, cfg.stats.n_bins)
    else:
        curve, per_case = lesion_distribution_curve(pd.DataFrame(columns=["case_id"]), cfg.stats.n_bins)
    lesions_df = pd.concat([f for f in lesion_frames if len(f)] or [pd.DataFrame(columns=LESION_VOLUME_COLUMNS)],
                           ignore_index=True)
    return DatasetStats(slices_df, cases_df, curve, per_case, pd.DataFrame(failures, columns=["case_id", "stage", "error"]),
                        lesions_df)


def write_dataset_stats(stats: DatasetStats, cfg: Config, out_dir: str | Path, title: str = "") -> dict[str, Path]:
    """Write the CSVs, the curve PNG and the resolved config; returns the paths."""
    from medseg.report.plots import plot_lesion_curve

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "slice_stats": atomic.write_csv(out / SLICE_STATS, stats.slices),
        "case_stats": atomic.write_csv(out / CASE_STATS, stats.cases),
        "lesion_curve": atomic.write_csv(out / LESION_CURVE, stats.curve),
        "lesion_curve_per_case": atomic.write_csv(out / LESION_CURVE_PER_CASE, stats.curve_per_case),
        "lesion_volumes": atomic.write_csv(out / LESION_VOLUMES, stats.lesions),
        "failures": atomic.write_csv(out / FAILURES_FILE, stats.failures),
    }
    if len(stats.curve):
        paths["lesion_curve_png"] = plot_lesion_curve(
            stats.curve, out / LESION_CURVE_PNG, axis_name=cfg.stats.axis, extent=cfg.stats.extent,
            per_case=stats.curve_per_case, title=title,
        )
    with atomic.atomic_path(out / RUN_CONFIG) as tmp:
        dump_config(cfg, tmp)
    paths["config"] = out / RUN_CONFIG
    return paths


def prediction_cases(cases: list[Case], pred_dir: str | Path) -> list[Case]:
    """Copies of ``cases`` whose label is the predicted mask in ``pred_dir`` (:func:`medseg.outputs.mask_file`)
    (cases without a prediction are left out), for statistics of the predictions."""
    from dataclasses import replace

    folder = Path(pred_dir)
    out = []
    for case in cases:
        mask = mask_file(folder, case.case_id)
        try:
            found = mask.is_file()
        except OSError as exc:  # e.g. an id too long for a file name: it cannot have a prediction
            log.warning("case %s: no prediction read (%s)", case.case_id, exc.strerror or exc)
            continue
        if found:
            out.append(replace(case, label=mask))
    return out
