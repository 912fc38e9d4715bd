"""Pull series from a PACS into a run folder and push SEGs back (what ``medseg pacs`` and the
``pacs_pull`` / ``pacs_push`` pipeline stages run).

Pull (:func:`pull`): query -> leave out series already answered (in the :class:`~.ledger.Ledger`,
or a medseg SEG in the archive references them) -> retrieve each remaining series into
``DATA/<StudyInstanceUID>/<SeriesInstanceUID>/`` (through a hidden ``.partial`` folder renamed
when complete, so a killed pull never leaves half a series) -> :func:`medseg.importers.import_dicom`
over ``DATA`` (one manifest row per series, pseudonymous case ids, channels from the model).
Series retrieved earlier into the same folder stay rows, so a rerun keeps its manifest.

Push (:func:`push`): every ``<case>_seg.dcm`` of a predictions folder whose source series the
ledger does not list as answered, checked against the archive first (a SEG stored by a run
killed before it wrote the ledger is not sent again), stored with retries; each outcome is a
ledger row. A failed store is a per-case failure carrying the PACS's status; the SEG and the
NIfTI mask stay where they are and a later push stores them.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import MedsegError, NothingToDo
from medseg.manifest import Case
from medseg.outputs import DICOM_SEG_SUFFIX
from medseg.pacs.config import PacsConfig
from medseg.pacs.contract import PacsClient, PacsError, SeriesInfo, with_retries
from medseg.pacs.ledger import FAILED, IN_PACS, STORED, Ledger

log = logging.getLogger(__name__)

PARTIAL = ".partial"


class NothingToAnswer(NothingToDo):
    """Every series the query matched is answered already (or none matched)."""


@dataclass
class PullResult:
    """``manifest`` (written) and its ``cases``; ``matched`` / ``answered`` / ``retrieved``
    series counts; ``failures``: ``{"case_id", "error"}`` per series not retrieved or refused
    by the import."""

    manifest: Path
    cases: list[Case]
    matched: int
    answered: int
    retrieved: int
    failures: list[dict[str, str]] = field(default_factory=list)


@dataclass
class PushResult:
    stored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # answered before: in the ledger or the archive
    failures: list[dict[str, str]] = field(default_factory=list)


def series_folder(data_dir: Path, series: SeriesInfo) -> Path:
    return data_dir / series.study_uid / series.series_uid


def _retrieved_series(data_dir: Path) -> set[str]:
    """SeriesInstanceUIDs with a complete folder under ``data_dir``."""
    if not data_dir.is_dir():
        return set()
    return {p.name for p in data_dir.glob("*/*") if p.is_dir() and not p.name.startswith(".")}


def _remove_partial(data_dir: Path) -> None:
    for partial in data_dir.glob(f"*/.*{PARTIAL}"):
        shutil.rmtree(partial, ignore_errors=True)


def find(client: PacsClient, cfg: PacsConfig, modalities: set[str]) -> list[SeriesInfo]:
    """The series the query settings match (with retries)."""
    return with_retries(cfg, f"query {client.description}", lambda: client.find_series(cfg, sorted(modalities)))


def answered_in_archive(client: PacsClient, cfg: PacsConfig, study_uids: set[str]) -> set[str]:
    answered: set[str] = set()
    for study_uid in sorted(study_uids):
        answered |= with_retries(cfg, "look for medseg SEGs", lambda s=study_uid: client.answered_series(s))
    return answered


def pull(
    client: PacsClient,
    cfg: PacsConfig,
    data_dir: Path,
    import_dir: Path,
    ledger: Ledger,
    model: Path | None = None,
) -> PullResult:
    """Query, retrieve and import (see the module docstring). ``import_dir`` receives
    ``manifest.csv``, ``dicom_series/`` and ``series_map.csv`` (folder, series UID -> case id).
    ``model``: a model folder or checkpoint; only series of its modality are retrieved, the
    rows are named after its channels. Raises :class:`NothingToAnswer` when no series is left."""
    from medseg import importers
    from medseg.auto.model_folder import read_model_inputs
    from medseg.manifest import write_manifest

    modalities = {cfg.modality} if cfg.modality else {"CT", "MR"}
    if model is not None:
        modalities &= {read_model_inputs(model).modality}
    matched = find(client, cfg, modalities) if modalities else []
    data_dir.mkdir(parents=True, exist_ok=True)
    _remove_partial(data_dir)
    here = _retrieved_series(data_dir)
    new = [s for s in matched if s.series_uid not in here and not ledger.answered(s.series_uid)]
    failures: list[dict[str, str]] = []
    try:
        in_archive = answered_in_archive(client, cfg, {s.study_uid for s in new})
    except PacsError as exc:
        in_archive = set()
        failures += [{"case_id": f"series {s.series_uid}", "error": f"not retrieved: {exc}"} for s in new]
        new = []
    todo = [s for s in new if s.series_uid not in in_archive]
    answered = sum(s.series_uid not in here and (ledger.answered(s.series_uid) or s.series_uid in in_archive)
                   for s in matched)
    log.info("pacs: %d series match the query on %s; %d retrieved before, %d answered before, %d to retrieve",
             len(matched), client.description, len(here & {s.series_uid for s in matched}), answered, len(todo))
    retrieved = 0
    for series in todo:
        try:
            n = _retrieve(client, cfg, data_dir, series)
        except PacsError as exc:
            failures.append({"case_id": f"series {series.series_uid}", "error": f"not retrieved: {exc}"})
            log.warning("pacs: series %s not retrieved: %s", series.series_uid, exc.status)
            continue
        retrieved += 1
        log.info("pacs: retrieved series %s (%s, %d instance(s))", series.series_uid, series.modality, n)
    if not _retrieved_series(data_dir):
        raise NothingToAnswer(
            f"pacs: nothing to answer on {client.description}: {len(matched)} {'/'.join(sorted(modalities))} series "
            f"match the query, {answered} answered already" + (f", {len(failures)} not retrieved" if failures else ""))
    result = importers.import_dicom(data_dir, map_file=import_dir / "series_map.csv",
                                    series_dir=import_dir / "dicom_series", model=model,
                                    modality=None if model is not None else cfg.modality)  # fmt: skip
    failures += [{"case_id": r.what, "error": r.error} for r in result.refusals]
    if not result.cases:
        raise MedsegError(f"pacs: no usable CT/MR series among those retrieved into {data_dir} "
                          f"({len(result.refusals)} refused: {[r.error for r in result.refusals][:3]})")
    manifest = write_manifest(result.cases, import_dir / "manifest.csv")
    return PullResult(manifest, result.cases, len(matched), answered, retrieved, failures)


def _retrieve(client: PacsClient, cfg: PacsConfig, data_dir: Path, series: SeriesInfo) -> int:
    final = series_folder(data_dir, series)
    partial = final.with_name(f".{final.name}{PARTIAL}")

    def attempt() -> int:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        n = client.retrieve_series(series, partial)
        if series.n_instances is not None and n != series.n_instances:
            raise PacsError("retrieve", f"{n} of the {series.n_instances} instance(s) the query listed came back")
        return n

    n = with_retries(cfg, f"retrieve series {series.series_uid}", attempt)
    partial.rename(final)  # the folder appears complete or not at all
    return n


def seg_files(pred_dir: Path, case_ids: set[str] | None = None) -> list[tuple[str, Path]]:
    """(case id, path) of every DICOM SEG in ``pred_dir`` (of ``case_ids`` when given)."""
    found = []
    for path in sorted(Path(pred_dir).glob(f"*{DICOM_SEG_SUFFIX}")):
        case_id = path.name[: -len(DICOM_SEG_SUFFIX)]
        if not path.name.startswith(".") and (case_ids is None or case_id in case_ids):
            found.append((case_id, path))
    return found


def push(client: PacsClient, cfg: PacsConfig, pred_dir: Path, ledger: Ledger, case_ids: set[str] | None = None) -> PushResult:
    """Store every SEG of ``pred_dir`` not answered yet (see the module docstring)."""
    import pydicom

    result = PushResult()
    archive: dict[str, set[str]] = {}
    for case_id, path in seg_files(pred_dir, case_ids):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            series_uid = str(header.ReferencedSeriesSequence[0].SeriesInstanceUID)
            study_uid, sop_uid = str(header.StudyInstanceUID), str(header.SOPInstanceUID)
        except (OSError, AttributeError, IndexError, pydicom.errors.InvalidDicomError) as exc:
            result.failures.append({"case_id": case_id, "error": f"{path}: not a readable DICOM SEG ({exc})"})
            continue
        if ledger.answered(series_uid):
            result.skipped.append(case_id)
            continue
        try:
            if study_uid not in archive:
                archive[study_uid] = answered_in_archive(client, cfg, {study_uid})
            if series_uid in archive[study_uid]:
                ledger.record(series_uid, study_uid, case_id, sop_uid, IN_PACS, "a medseg SEG of this series is in the PACS")
                result.skipped.append(case_id)
                log.info("pacs: %s already answered in the PACS; not stored again", case_id)
                continue
            status = with_retries(cfg, f"store {case_id}", lambda p=path: client.store(p))
        except PacsError as exc:
            ledger.record(series_uid, study_uid, case_id, sop_uid, FAILED, exc.status)
            result.failures.append({"case_id": case_id, "error": f"{exc}; the SEG stays at {path} and a later run "
                                                                 "stores it"})
            log.warning("pacs: %s not stored: %s", case_id, exc.status)
            continue
        ledger.record(series_uid, study_uid, case_id, sop_uid, STORED, status)
        result.stored.append(case_id)
        log.info("pacs: %s stored (%s)", case_id, status)
    return result
