"""Batches (``run_inference``, a :class:`BatchRun`): resume, the overlapped reader/finisher, failures
recorded per case, torchrun sharding and the run record (module docstring of :mod:`.runner`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from medseg import __version__
from medseg.atomic import write_csv, write_json
from medseg.errors import MedsegError
from medseg.inference.bundle import InferenceBundle
from medseg.inference.cascade import CascadeStats
from medseg.inference.case import CasePredictor, PreparedCase
from medseg.inference.case_files import (
    SEG_NOT_ASKED,
    PartialCaseError,
    case_name_problem,
    discard_case,
    expected_outputs,
    is_complete,
    read_marker,
)
from medseg.inference.cases import InferenceCase
from medseg.inference.preflight import preflight
from medseg.input_identity import inputs_identity
from medseg.outputs import CASES_COLUMNS, CASES_TABLE, FAILURES_FILE, INFERENCE_RECORD
from medseg.progress import progress_enabled
from medseg.runtime import (
    barrier,
    join_process_group,
    leave_process_group,
    shard,
    torchrun_rank,
)

log = logging.getLogger(__name__)

RUN_RECORD = INFERENCE_RECORD


# --------------------------------------------------------------------------- batches


@dataclass
class RunSummary:
    """Case ids this rank completed, skipped (already complete) and failed (case_id, error)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, MedsegError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _rank_failures_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f".failures.rank{rank}.csv"


def merge_failures(out_dir: Path, world: int, failures_file: str = FAILURES_FILE) -> pd.DataFrame:
    """Rank 0: concatenate every rank's failure file into ``failures_file`` (then remove them)."""
    frames = []
    for rank in range(world):
        part = _rank_failures_path(out_dir, rank)
        if part.is_file():
            frames.append(pd.read_csv(part, dtype=str, keep_default_na=False))
    merged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["case_id", "error"])
    merged = merged.sort_values("case_id", kind="stable").reset_index(drop=True)
    write_csv(out_dir / failures_file, merged)
    for rank in range(world):
        _rank_failures_path(out_dir, rank).unlink(missing_ok=True)
    return merged


class BatchRun:
    """One batch of cases into ``out_dir`` (see :func:`run_inference`, which is its entry point).

    Per rank: :meth:`run` skips the cases already complete, predicts the others (with
    ``inference.prefetch``: the next case is read in one thread and the previous one finished and
    written in another while the network runs on the current one), records each failing case
    (:meth:`record_failure`) and carries on, then writes ``failures_file`` (merged by rank 0
    under torchrun) and rank 0's ``inference.json``.
    """

    def __init__(
        self,
        bundle: InferenceBundle,
        out_dir: str | Path,
        show_progress: bool = True,
        rank_sharding: bool = True,
        failures_file: str = FAILURES_FILE,
    ) -> None:
        self.bundle = bundle
        self.out = Path(out_dir)
        self.show_progress = progress_enabled(show_progress)  # bars on a terminal; logs get lines
        self.rank_sharding = rank_sharding
        self.failures_file = failures_file
        self.rank, self.world = torchrun_rank() if rank_sharding else (0, 1)
        self.fingerprint = bundle.fingerprint()
        self.predictor = CasePredictor(bundle)
        self.summary = RunSummary()
        cfg = bundle.inference
        self.overlap = cfg.prefetch if cfg.prefetch != "auto" else bundle.device.type == "cuda"
        # the previous case, post-processed and written in the background: (case_id, its future)
        self.finishing: tuple[str, Future[None]] | None = None
        self.bar: Any = None
        self.cases: list[InferenceCase] = []
        # case_id -> its inputs' identity taken before they are read (the marker records it)
        self.inputs: dict[str, dict[str, Any]] = {}

    def todo(self, cases: Sequence[InferenceCase]) -> list[InferenceCase]:
        """This rank's share of ``cases`` less those refused by :func:`.preflight.preflight` or
        with an id too long to name their files (:func:`.outputs.case_name_problem`), recorded
        as failures now, before any inference, and those complete in the output folder for
        their current input files (recorded as skipped; a case whose scan was replaced since
        is predicted again)."""
        cfg = self.bundle.inference
        mine = shard(cases, self.rank, self.world)
        for case in mine:
            if case.problem is None:
                case.problem = case_name_problem(case.case_id)
        mine = preflight(mine, self.bundle.channels, self.bundle.modality, cfg)
        todo: list[InferenceCase] = []
        for case in mine:
            if case.problem is not None:
                self.record_failure(case.case_id, MedsegError(f"case {case.case_id}: {case.problem}"))
                continue
            expected = expected_outputs(case.case_id, cfg.write_prob, cfg.write_lesions, cfg.output_format)
            self.inputs[case.case_id] = inputs_identity(case.images)
            if is_complete(self.out, case.case_id, expected, self.fingerprint, self.inputs[case.case_id]):
                self.summary.skipped.append(case.case_id)
            else:
                todo.append(case)
        if self.summary.failures and self.world == 1:  # the refusals are on disk before the long part starts
            write_csv(self.out / self.failures_file, pd.DataFrame(self.summary.failures, columns=["case_id", "error"]))
        if self.summary.skipped:
            log.info("rank %d: %d case(s) already complete, skipped", self.rank, len(self.summary.skipped))
        return todo

    def prepare(self, case: InferenceCase) -> PreparedCase:
        """Read and preprocess ``case`` after removing its outputs of earlier settings or inputs
        (e.g. a ``_prob`` no longer asked for). Raises ``MedsegError`` for a case with a known
        problem, or whose earlier outputs cannot be removed (``OutputError`` naming the path)."""
        if case.problem is not None:
            raise MedsegError(f"case {case.case_id}: {case.problem}")
        discard_case(self.out, case.case_id)
        return self.predictor.prepare(case)

    def record_failure(self, case_id: str, exc: BaseException) -> None:
        """Record ``case_id`` as failed with ``exc``'s text and remove whatever it left. Never
        raises: a file that cannot be removed is added to the case's error (and logged), so one
        case's clean-up cannot stop the batch."""
        error = _error_text(exc)
        if case_name_problem(case_id) is None:  # never touch files an unusable id could name
            try:
                discard_case(self.out, case_id)
            except (OSError, MedsegError) as cleanup:  # OutputError naming the path that stays
                if _error_text(cleanup) not in error:  # e.g. the folder prepare already named
                    error = f"{error}; its outputs could not be removed: {_error_text(cleanup)}"
        self.summary.failures.append((case_id, error))
        log.warning("case %s failed: %s", case_id, error)

    def finish_and_write(self, prepared: PreparedCase, prob: torch.Tensor, seconds: float) -> None:
        """:meth:`.case.CasePredictor.finish` with every output written, the marker last with the
        case's inputs' identity as :meth:`todo` took it (before the case was read: a scan
        replaced while it was predicted makes the next run predict it again)."""
        case_id = prepared.case.case_id
        self.predictor.finish_and_write(prepared, prob, seconds, self.out, self.fingerprint, self.inputs.get(case_id))

    def settle(self) -> None:
        """Wait for the previous case's outputs and record its result (keeps one case pending)."""
        if self.finishing is None:
            return
        case_id, future = self.finishing
        self.finishing = None
        try:
            future.result()
            self.summary.done.append(case_id)
            self.say_done(case_id)
        except PartialCaseError as exc:  # the SEG failed; the NIfTI mask and tables stay
            self.summary.failures.append((case_id, str(exc)))
            log.warning("case %s failed: %s", case_id, exc)
        except Exception as exc:  # noqa: BLE001
            self.record_failure(case_id, exc)
        self.bar.update(1)

    def say_done(self, case_id: str) -> None:
        """One line per finished case (the plain-log progress; a TTY shows the bars instead)."""
        record = read_marker(self.out, case_id)
        if record is None:
            return
        cohort = record.get("cohort") or {}
        seconds = sum(v for v in (record.get("timings_s") or {}).values() if isinstance(v, (int, float)))
        log.info("case %s done: %s lesion(s), %s mL, %.1f s", case_id, cohort.get("n_lesions", "?"),
                 cohort.get("total_volume_ml", "?"), seconds)

    def predict_all(self, todo: Sequence[InferenceCase]) -> None:
        """Predict ``todo`` one after the other; with ``overlap``, one thread reads the next case and
        another post-processes and writes the previous one while this thread runs the network on
        the current one (without it, the finishing thread is waited for at once)."""
        overlap = self.overlap
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-prefetch") as reader, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-finish") as finisher:
            upcoming: Future[PreparedCase] | None = reader.submit(self.prepare, todo[0]) if todo and overlap else None
            for i, case in enumerate(todo):
                current: PreparedCase | None = None
                prob: torch.Tensor | None = None
                try:
                    current = upcoming.result() if upcoming is not None else self.prepare(case)
                except Exception as exc:  # noqa: BLE001 - one bad case must not stop the batch
                    error: BaseException = exc
                upcoming = reader.submit(self.prepare, todo[i + 1]) if overlap and i + 1 < len(todo) else None
                if current is not None:
                    try:
                        with self.slice_bar(case.case_id, self.predictor.n_slices(current)) as advance:
                            prob, seconds = self.predictor.probabilities(current, advance)
                        self.say_cascade(case.case_id, current.cascade)
                    except Exception as exc:  # noqa: BLE001
                        error = exc
                self.settle()
                if current is None or prob is None:
                    self.record_failure(case.case_id, error)
                    self.bar.update(1)
                else:
                    self.finishing = (case.case_id, finisher.submit(self.finish_and_write, current, prob, seconds))
                    if not overlap:
                        self.settle()  # one case at a time: its outputs before the next case is read
                del current, prob
            self.settle()

    def say_cascade(self, case_id: str, stats: CascadeStats | None) -> None:
        """One line per case predicted by a fold-ensemble cascade: what the other models skipped."""
        if stats is None:
            return
        log.info("case %s: cascade, the other %d model(s) skipped %.1f%% of %d slices, %.1f%% of the slice x pixel "
                 "work", case_id, len(self.bundle.models) - 1, 100 * stats.slices_skipped, stats.n_slices,
                 100 * stats.pixels_skipped)

    def cascade_record(self, cases: Sequence[InferenceCase]) -> dict[str, Any]:
        """``inference.json``'s ``cascade``: whether the ensemble ran as a cascade, and the mean
        fractions its other models skipped over the cases of ``cases`` whose marker records them
        (predicted now or by an earlier run with the same settings; 0 such cases: None)."""
        cfg = self.bundle.inference
        records = [r["cascade"] for r in (read_marker(self.out, c.case_id) for c in cases)
                   if r is not None and isinstance(r.get("cascade"), dict)]  # fmt: skip
        slices = [float(r["slices_skipped"]) for r in records]
        pixels = [float(r["pixels_skipped"]) for r in records]
        return {
            "enabled": bool(cfg.cascade and len(self.bundle.models) >= 2),
            "cases": len(records),
            "mean_slices_skipped": round(sum(slices) / len(slices), 4) if slices else None,
            "mean_pixels_skipped": round(sum(pixels) / len(pixels), 4) if pixels else None,
        }

    @contextmanager
    def slice_bar(self, case_id: str, n_slices: int) -> Iterator[Callable[[int], None] | None]:
        """A progress bar over one case's slices while the network runs (a TTY only), as a
        callback taking the number of slices done; None without a bar."""
        if not self.show_progress or self.world > 1:
            yield None
            return
        from tqdm import tqdm

        with tqdm(total=n_slices, desc=f"  {case_id}", unit="slice", leave=False) as bar:
            yield lambda done: bar.update(done - bar.n)

    def write_cases_table(self, cases: Sequence[InferenceCase]) -> None:
        """``cases.csv`` (:data:`medseg.outputs.CASES_COLUMNS`): one row per case of ``cases``
        whose marker is in the output folder (predicted now or before, or kept after a failed
        SEG), from the numbers the marker holds."""
        rows = []
        for case in cases:
            record = read_marker(self.out, case.case_id)
            if record is None:
                continue
            cohort = record.get("cohort") or {}
            rows.append({"case_id": case.case_id, **{c: cohort.get(c) for c in CASES_COLUMNS[1:-1]},
                         "dicom_seg": record.get("dicom_seg", SEG_NOT_ASKED)})
        write_csv(self.out / CASES_TABLE, pd.DataFrame(rows, columns=list(CASES_COLUMNS)))

    def write_records(self) -> None:
        """``failures_file`` (this rank's, merged by rank 0 after a barrier under torchrun) and,
        on rank 0, ``inference.json``."""
        out, rank, world, summary = self.out, self.rank, self.world, self.summary
        frame = pd.DataFrame(summary.failures, columns=["case_id", "error"])
        if world > 1:
            write_csv(_rank_failures_path(out, rank), frame)
            barrier(world)
            if rank == 0:
                merge_failures(out, world, self.failures_file)
        else:
            write_csv(out / self.failures_file, frame)
        if rank == 0:
            bundle = self.bundle
            self.write_cases_table(self.cases)
            write_json(out / RUN_RECORD, {
                "medseg_version": __version__,
                "checkpoints": [str(p) for p in bundle.checkpoints],
                "model": bundle.identity,
                "qc": {k: v for k, v in (self.predictor.qc or {}).items() if k != "cases"} or None,
                "channels": bundle.channels,
                "modality": bundle.modality,
                "device": str(bundle.device),
                "world_size": world,
                "inference": bundle.inference.model_dump(mode="json"),
                "cascade": self.cascade_record(self.cases),
                "rank0": {"done": len(summary.done), "skipped": len(summary.skipped),
                          "failed": len(summary.failures), "seconds": round(summary.seconds, 3)},
            })

    def run(self, cases: Sequence[InferenceCase]) -> RunSummary:
        """The whole batch (class docstring); returns this rank's summary."""
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        # early: a broken torchrun setup fails before any work
        created_group = join_process_group(self.world) if self.rank_sharding else False
        start = time.perf_counter()
        self.cases = list(cases)
        todo = self.todo(cases)
        rank, world = self.rank, self.world
        self.bar = tqdm(total=len(todo), desc="infer" if world == 1 else f"infer rank {rank}", unit="case",
                        disable=not self.show_progress, position=rank if world > 1 else None)
        with bar_safe_logging(self.show_progress):
            self.predict_all(todo)
        self.bar.close()
        self.summary.seconds = time.perf_counter() - start
        self.write_records()
        leave_process_group(created_group)
        return self.summary


@contextmanager
def bar_safe_logging(active: bool) -> Iterator[None]:
    """While progress bars are on screen, console log lines are written above them (tqdm.write)
    instead of cutting into them."""
    if not active:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield


def run_inference(
    cases: Sequence[InferenceCase],
    bundle: InferenceBundle,
    out_dir: str | Path,
    show_progress: bool = True,
    rank_sharding: bool = True,
    failures_file: str = FAILURES_FILE,
) -> RunSummary:
    """Predict every case not already complete in ``out_dir`` (this rank's share under torchrun).

    Writes each case's outputs (:mod:`.outputs`), ``failures_file`` (case_id, error; header
    only when nothing failed; merged by rank 0) and ``inference.json`` (settings, checkpoints,
    counts, a fold-ensemble cascade's mean skipped fractions; rank 0). ``rank_sharding=False``:
    this process predicts every case given, whatever torchrun's environment says (the caller
    shares the work out, e.g. one CV fold per rank).
    Returns this rank's summary (:class:`BatchRun`).
    """
    return BatchRun(bundle, out_dir, show_progress, rank_sharding, failures_file).run(cases)
