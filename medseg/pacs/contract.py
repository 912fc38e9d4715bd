"""The PACS client contract every transport implements (DICOMweb in :mod:`.client`, DIMSE in
:mod:`.dimse`): :class:`PacsClient`, the :class:`SeriesInfo` a query answers, :class:`PacsError`
(what the PACS said, or why it said nothing) and :func:`with_retries` (bounded retries with
exponential backoff). The table of calls is in :mod:`.client`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from medseg.errors import MedsegError
from medseg.pacs.config import PacsConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
SEG_MANUFACTURER = "medseg"  # what medseg's SEG writer puts in Manufacturer (medseg.dicom.seg_writer)

class PacsError(MedsegError):
    """The PACS did not do ``action``; ``status``: what it answered, or why it did not."""

    def __init__(self, action: str, status: str) -> None:
        self.action = action
        self.status = status
        super().__init__(f"{action}: {status}")


@dataclass(frozen=True)
class SeriesInfo:
    """One series of the archive, as the query answered it (UIDs, no patient attributes)."""

    study_uid: str
    series_uid: str
    modality: str
    series_number: str = ""
    n_instances: int | None = None
    study_date: str = ""


class PacsClient(Protocol):
    description: str

    def find_series(self, query: PacsConfig, modalities: Iterable[str]) -> list[SeriesInfo]: ...

    def retrieve_series(self, series: SeriesInfo, folder: Path) -> int: ...

    def store(self, path: Path) -> str: ...

    def answered_series(self, study_uid: str) -> set[str]: ...


def with_retries(cfg: PacsConfig, action: str, call: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, tried ``1 + cfg.retries`` times while it raises :class:`PacsError`, waiting
    ``cfg.backoff_s * 2**attempt`` seconds between tries (e.g. backoff 2 s, 2 retries: waits 2 s
    then 4 s). The last error is raised with the number of attempts."""
    attempts = 1 + cfg.retries
    for attempt in range(attempts):
        try:
            return call()
        except PacsError as exc:
            if attempt + 1 == attempts:
                raise PacsError(action, f"{exc.status} (after {attempts} attempt(s))") from None
            wait = cfg.backoff_s * 2**attempt
            log.warning("%s: %s; trying again in %.1f s (%d of %d)", action, exc.status, wait, attempt + 2, attempts)
            sleep(wait)
    raise AssertionError("unreachable")


def study_searches(query: PacsConfig, base: dict[str, Any]) -> list[dict[str, Any]]:
    """The study queries a ``pacs:`` section asks for: ``base`` (the transport's keys for date,
    modality...) once per accession number, else once per study UID, else once as it is."""
    if query.accession_numbers:
        return [{**base, "AccessionNumber": a} for a in query.accession_numbers]
    if query.study_uids:
        return [{**base, "StudyInstanceUID": u} for u in query.study_uids]
    return [base]
