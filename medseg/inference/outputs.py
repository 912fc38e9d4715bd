"""Per-case output files, their completion marker, and resuming.

Every file is written atomically (temporary file + rename, :mod:`medseg.atomic`), and the
marker ``<case>_complete.json`` last. A case counts as done only when its marker exists, was
written with the same settings (``fingerprint``), lists every output the current settings
need, and every listed file exists with the size the marker recorded. A killed run therefore
leaves the case incomplete (no marker, or a file missing), never "done" with a truncated file;
its temporary ``.<case>_*.partial-*`` files are removed when the case is redone.

File names (the contract of :mod:`medseg.evaluation`): ``<case>_mask.nii.gz`` (uint8),
``<case>_prob.nii.gz`` (float32, optional), ``<case>_lesions.nii.gz`` (uint16/uint32
instance ids) and ``<case>_lesions.csv``.
"""

from __future__ import annotations

import glob
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medseg.atomic import atomic_path, write_json
from medseg.io import Geometry, write_volume

MASK_SUFFIX = "_mask.nii.gz"
PROB_SUFFIX = "_prob.nii.gz"
LESIONS_SUFFIX = "_lesions.nii.gz"
LESIONS_CSV_SUFFIX = "_lesions.csv"
MARKER_SUFFIX = "_complete.json"


def expected_outputs(case_id: str, write_prob: bool, write_lesions: bool) -> list[str]:
    """File names the current settings produce for ``case_id`` (the marker excluded)."""
    names = [case_id + MASK_SUFFIX]
    if write_prob:
        names.append(case_id + PROB_SUFFIX)
    if write_lesions:
        names += [case_id + LESIONS_SUFFIX, case_id + LESIONS_CSV_SUFFIX]
    return names


def marker_path(out_dir: Path, case_id: str) -> Path:
    return out_dir / (case_id + MARKER_SUFFIX)


def is_complete(out_dir: Path, case_id: str, expected: list[str], fingerprint: str) -> bool:
    """True when ``case_id``'s marker vouches for every file in ``expected`` (module docstring)."""
    marker = marker_path(out_dir, case_id)
    try:
        record = json.loads(marker.read_text())
        files: dict[str, int] = record["files"]
        if record.get("fingerprint") != fingerprint:
            return False
        return all(name in files and (out_dir / name).stat().st_size == files[name] for name in expected)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def start_case(out_dir: Path, case_id: str) -> None:
    """Before (re)computing a case: drop its marker and any temporary files a killed run left."""
    marker_path(out_dir, case_id).unlink(missing_ok=True)
    for leftover in glob.glob(str(out_dir / f".{glob.escape(case_id)}_*.partial-*")):
        Path(leftover).unlink(missing_ok=True)


def discard_case(out_dir: Path, case_id: str) -> None:
    """After a failure: remove every output of ``case_id`` (none may pass for this run's result)."""
    start_case(out_dir, case_id)
    for suffix in (MASK_SUFFIX, PROB_SUFFIX, LESIONS_SUFFIX, LESIONS_CSV_SUFFIX):
        (out_dir / (case_id + suffix)).unlink(missing_ok=True)


def write_table(path: Path, table: pd.DataFrame) -> Path:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    return path


def write_case(
    out_dir: Path,
    case_id: str,
    geometry: Geometry,
    mask: np.ndarray,
    fingerprint: str,
    prob: np.ndarray | None = None,
    lesions: np.ndarray | None = None,
    table: pd.DataFrame | None = None,
    info: dict[str, Any] | None = None,
) -> list[Path]:
    """Write one case's outputs on ``geometry`` (the source grid), then its marker.

    ``mask``: uint8 (I, J, K); ``prob``: float32 (I, J, K) or None; ``lesions``: instance ids
    (I, J, K) and ``table`` (both or neither). ``info`` goes into the marker (with the
    seconds spent writing). Returns the written paths (marker last).
    """
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    volumes: list[tuple[np.ndarray, str, Any]] = [(mask, MASK_SUFFIX, np.uint8)]
    if prob is not None:
        volumes.append((prob, PROB_SUFFIX, np.float32))
    if lesions is not None and table is not None:
        volumes.append((lesions, LESIONS_SUFFIX, lesions.dtype))
    # one thread per volume: the axis-reordering copy and the gzip compression release the GIL
    with ThreadPoolExecutor(max_workers=len(volumes), thread_name_prefix="medseg-write") as pool:
        futures = [pool.submit(write_volume, array, geometry, out_dir / (case_id + suffix), dtype=dtype)
                   for array, suffix, dtype in volumes]
        written = [future.result() for future in futures]
    if lesions is not None and table is not None:
        written.append(write_table(out_dir / (case_id + LESIONS_CSV_SUFFIX), table))
    record = {"case_id": case_id, "fingerprint": fingerprint, "files": {p.name: p.stat().st_size for p in written},
              **(info or {}), "write_seconds": round(time.perf_counter() - start, 4)}
    written.append(write_json(marker_path(out_dir, case_id), record))
    return written
