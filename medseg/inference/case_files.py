"""Per-case output files, their completion marker, and resuming.

Every file is written atomically (temporary file + rename, :mod:`medseg.atomic`), and the
marker (:func:`medseg.outputs.marker_file`) last. A case counts as done only when its marker exists, was
written with the same settings (``fingerprint``), lists every output the current settings
need, and every listed file exists with the size the marker recorded. A killed run therefore
leaves the case incomplete (no marker, or a file missing), never "done" with a truncated file;
a case that is (re)computed first loses every output an earlier run wrote for it (its
temporary ``.<case>_*.partial-*`` files, and e.g. a probability map the current settings no
longer ask for), so no file of older settings stays beside the new ones.

The marker also records the case's inputs (``inputs``: each channel file's identity,
:func:`medseg.input_identity.inputs_identity`: size, mtime and a hash of its first 64 KiB), so a
scan replaced in place is predicted again rather than passed off as done.

Clean-up never hides a case's own error: removing its files raises ``OutputError`` naming the
path that stays (e.g. a folder squatting on the case's mask path), which a batch records as
that case's failure (:meth:`medseg.inference.batch.BatchRun.record_failure`) and goes on. A case
id too long to name its files (:data:`CASE_NAME_EXTRA_BYTES`, :func:`case_name_problem`) is
refused before any file is made from it.

File names and types: :mod:`medseg.outputs` (the prediction-folder contract).
"""

from __future__ import annotations

import glob
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medseg.atomic import atomic_path, write_json
from medseg.config import DicomSegConfig
from medseg.errors import MedsegError, OutputError
from medseg.io import Geometry, write_volume
from medseg.manifest import case_id_problem
from medseg.outputs import (
    CASE_SUFFIXES,
    LESIONS_CSV_SUFFIX,
    LESIONS_SUFFIX,
    MARKER_SUFFIX,
    MASK_SUFFIX,
    PROB_SUFFIX,
    case_output_names,
    dicom_seg_file,
    marker_file,
)

expected_outputs = case_output_names  # the names the current settings produce (medseg.outputs)
marker_path = marker_file


# The longest name a case's file takes beyond its id: atomic.atomic_path's temporary name
# ".<case_id><suffix stem>.partial-<pid><extension>" of the longest suffix; a pid has at most 7
# digits (Linux's largest pid_max, 4194304).
_TEMP_NAME_EXTRA = len(".") + len(".partial-") + 7
CASE_NAME_EXTRA_BYTES = _TEMP_NAME_EXTRA + max(len(s.encode()) for s in (*CASE_SUFFIXES, MARKER_SUFFIX))


def case_name_problem(case_id: str) -> str | None:
    """Why ``case_id`` cannot name this folder's files (:func:`medseg.manifest.case_id_problem`,
    with the bytes of the longest name medseg makes from it), or None."""
    return case_id_problem(case_id, name_extra=CASE_NAME_EXTRA_BYTES)


def read_marker(out_dir: Path, case_id: str) -> dict[str, Any] | None:
    """``case_id``'s completion marker as written (files, fingerprint, inputs, cohort numbers,
    timings), or None when there is none or it cannot be read."""
    try:
        record = json.loads(marker_path(out_dir, case_id).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_complete(
    out_dir: Path, case_id: str, expected: list[str], fingerprint: str, inputs: dict[str, Any] | None = None
) -> bool:
    """True when ``case_id``'s marker vouches for every file in ``expected`` (module docstring),
    and, with ``inputs`` (:func:`medseg.input_identity.inputs_identity` of the case's channel
    files now), was written for inputs with that identity."""
    record = read_marker(out_dir, case_id)
    if record is None:
        return False
    try:
        files: dict[str, int] = record["files"]
        if record.get("fingerprint") != fingerprint:
            return False
        if inputs is not None and record.get("inputs") != inputs:
            return False
        return all(name in files and (out_dir / name).stat().st_size == files[name] for name in expected)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove(path: Path) -> None:
    """Remove the file ``path`` if there is one; ``OutputError`` naming it when it stays (a
    folder in its place, no permission)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        if isinstance(exc, IsADirectoryError) or os.path.isdir(path):  # macOS says EPERM for a folder
            raise OutputError(path, "a folder is in the place of this case's output file; remove or rename it") from None
        raise OutputError(path, f"cannot remove this case's earlier output: {exc.strerror or exc}") from None


def _leftovers(out_dir: Path, case_id: str) -> list[Path]:
    """The temporary files a killed run left for ``case_id``."""
    try:
        return [Path(p) for p in glob.glob(str(out_dir / f".{glob.escape(case_id)}_*.partial-*"))]
    except OSError:
        return []


def _remove_all(paths: list[Path]) -> None:
    """Remove every file of ``paths`` that exists; then raise ``OutputError`` naming those that
    stay (each path is tried, so one stuck file does not keep the others)."""
    problems: list[OutputError] = []
    for path in paths:
        try:
            _remove(path)
        except OutputError as exc:
            problems.append(exc)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise OutputError(problems[0].path, "; ".join([problems[0].problem, *(str(p) for p in problems[1:])]))


def start_case(out_dir: Path, case_id: str) -> None:
    """Before (re)computing a case: drop its marker and any temporary files a killed run left.
    Raises ``OutputError`` naming a path that cannot be removed."""
    _remove_all([marker_path(out_dir, case_id), *_leftovers(out_dir, case_id)])


def discard_case(out_dir: Path, case_id: str) -> None:
    """Remove every output of ``case_id`` (before computing it again, and after a failure: none
    may pass for this run's result). Raises ``OutputError`` naming the paths that stay."""
    _remove_all([marker_path(out_dir, case_id), *_leftovers(out_dir, case_id),
                 *(out_dir / (case_id + suffix) for suffix in CASE_SUFFIXES)])


def write_table(path: Path, table: pd.DataFrame) -> Path:
    """A case's lesion table, its numbers rounded as every medseg table (:mod:`medseg.rounding`)."""
    from medseg.rounding import round_table

    with atomic_path(path) as tmp:
        round_table(table).to_csv(tmp, index=False)
    return path


def lesion_map_dtype(n_lesions: int) -> type:
    """Smallest unsigned integer type holding instance ids 0..``n_lesions`` (the lesion map's
    file type: uint8 for up to 255 lesions writes in half the time of uint16 on a BraTS case)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if n_lesions <= np.iinfo(dtype).max:
            return dtype
    raise ValueError(f"{n_lesions} lesions do not fit a uint32 lesion map")


class PartialCaseError(MedsegError):
    """A case whose DICOM SEG could not be written: its NIfTI mask, lesion table and marker are
    kept (the batch records it in ``failures.csv`` without removing them)."""


SEG_WRITTEN = "written"
SEG_WRITTEN_NEW_FOR = "written (new frame of reference)"
SEG_NOT_ASKED = "not asked"


@dataclass
class SegExport:
    """How one case's DICOM SEG is made: the source series folder it references, the SEG
    settings, what made it (:class:`medseg.dicom.seg_writer.Algorithm`), the model's classes,
    and whether the source lacks a Frame of Reference UID and the SEG gets a new one."""

    source: Path
    settings: DicomSegConfig
    algorithm: Any
    n_classes: int = 1
    new_frame_of_reference: bool = False

    @property
    def status(self) -> str:
        """What ``cases.csv`` says of a SEG written this way."""
        return SEG_WRITTEN_NEW_FOR if self.new_frame_of_reference else SEG_WRITTEN

    def write(self, mask: np.ndarray, geometry: Geometry, path: Path, probability: np.ndarray | None) -> Path:
        from medseg.dicom.seg_writer import write_dicom_seg

        return write_dicom_seg(mask, geometry, self.source, path, self.settings, self.algorithm,
                               probability if self.settings.fractional else None, self.n_classes)


class CaseWriter:
    """Writes one case's outputs on ``geometry`` (the source grid) as each becomes ready.

    Each volume is written in its own thread from the moment it is handed over (the
    axis-reordering copy and the gzip compression release the GIL), so writing the mask
    overlaps labelling the lesions and measuring their table. Use as a context manager:
    leaving it waits for every pending write, also after an error (so a caller removing the
    case's files afterwards leaves none behind). :meth:`close` writes the marker, last, with
    ``fingerprint`` (the settings) and ``inputs`` (the identity of the case's input files as
    they were before they were read, :func:`medseg.input_identity.inputs_identity`; None: not
    known, and :func:`is_complete` asked with inputs takes the case as not done).
    """

    def __init__(
        self, out_dir: Path, case_id: str, geometry: Geometry, fingerprint: str, inputs: dict[str, Any] | None = None
    ) -> None:
        self.out_dir, self.case_id, self.geometry, self.fingerprint = out_dir, case_id, geometry, fingerprint
        self.inputs = inputs
        self.start = time.perf_counter()
        out_dir.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="medseg-write")
        self._pending: list[Future[Path]] = []
        self._written: list[Path] = []
        # the SEG apart: its failure keeps the other outputs (mask kept to write it as NIfTI then)
        self._seg: tuple[SegExport, Future[Path], np.ndarray] | None = None

    def __enter__(self) -> CaseWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)

    def mask(self, mask: np.ndarray) -> None:
        """Start writing the uint8 mask (I, J, K)."""
        self._volume(MASK_SUFFIX, mask, np.uint8)

    def probability(self, prob: np.ndarray) -> None:
        """Start writing the float32 lesion probability (I, J, K)."""
        self._volume(PROB_SUFFIX, prob, np.float32)

    def lesions(self, labels: np.ndarray, n_lesions: int) -> None:
        """Start writing the instance map (I, J, K) of ids 0..``n_lesions``, in the smallest
        unsigned type that holds them (:func:`lesion_map_dtype`)."""
        self._volume(LESIONS_SUFFIX, labels, lesion_map_dtype(n_lesions))

    def dicom_seg(self, export: SegExport, mask: np.ndarray, probability: np.ndarray | None) -> None:
        """Start writing the DICOM SEG of ``mask`` (I, J, K) referencing ``export.source``."""
        path = dicom_seg_file(self.out_dir, self.case_id)
        self._seg = (export, self._pool.submit(export.write, mask, self.geometry, path, probability), mask)

    def table(self, table: pd.DataFrame) -> None:
        """Write the lesion table now."""
        self._written.append(write_table(self.out_dir / (self.case_id + LESIONS_CSV_SUFFIX), table))

    def _volume(self, suffix: str, array: np.ndarray, dtype: Any) -> None:
        path = self.out_dir / (self.case_id + suffix)
        self._pending.append(self._pool.submit(write_volume, array, self.geometry, path, dtype=dtype))

    def close(self, info: dict[str, Any] | None = None) -> list[Path]:
        """Wait for the volumes, then write the marker (with ``info``, what became of the DICOM
        SEG, and the seconds since the writer was made). Returns the written paths, marker last;
        raises the first volume write error. A SEG that could not be written leaves the other
        outputs and a marker that does not list it (so a rerun computes the case again), the mask
        also written as NIfTI when only the SEG was asked for, and raises
        :class:`PartialCaseError`."""
        written = [future.result() for future in self._pending] + self._written
        seg_status, seg_error = SEG_NOT_ASKED, None
        if self._seg is not None:
            export, future, mask = self._seg
            try:
                written.append(future.result())
                seg_status = export.status
            except Exception as exc:  # noqa: BLE001 - any failure of the SEG keeps the other outputs
                seg_error = str(exc) if isinstance(exc, MedsegError) else f"{type(exc).__name__}: {exc}"
                seg_status = f"failed: {seg_error}"
                if not any(p.name.endswith(MASK_SUFFIX) for p in written):
                    written.append(write_volume(mask, self.geometry, self.out_dir / (self.case_id + MASK_SUFFIX),
                                                dtype=np.uint8))
        record = {"case_id": self.case_id, "fingerprint": self.fingerprint, "inputs": self.inputs,
                  "files": {p.name: p.stat().st_size for p in written}, "dicom_seg": seg_status,
                  **(info or {}), "write_seconds": round(time.perf_counter() - self.start, 4)}
        written.append(write_json(marker_path(self.out_dir, self.case_id), record))
        if seg_error is not None:
            raise PartialCaseError(f"case {self.case_id}: DICOM SEG not written ({seg_error}); its NIfTI mask and "
                                   f"lesion table are kept in {self.out_dir}")
        return written
