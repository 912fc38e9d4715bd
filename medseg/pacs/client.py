"""Talking to an archive: :class:`PacsClient` (the contract), :class:`DicomWebClient` (QIDO-RS,
WADO-RS, STOW-RS through ``dicomweb-client``; :mod:`medseg.pacs.dimse` has the DIMSE one),
:func:`connect` (the client ``pacs:`` names) and :func:`.contract.with_retries` (bounded retries with
exponential backoff).

Contract of a client (one attempt per call; :func:`.contract.with_retries` repeats):

=====================================  ==========================================================
``find_series(query, modalities)``     the series of the studies matching ``query`` whose
                                       Modality is in ``modalities``: :class:`SeriesInfo` list
``retrieve_series(series, folder)``    every instance of the series written as a file into
                                       ``folder`` (which exists and is empty); returns the count
``store(path)``                        one DICOM file stored; returns the PACS's status text
``answered_series(study_uid)``         SeriesInstanceUIDs of the study that a medseg DICOM SEG
                                       (Manufacturer ``medseg``) in the archive references
=====================================  ==========================================================

Every failure is a :class:`PacsError` whose ``status`` is what the PACS said (``HTTP 503
Service Unavailable``, ``refused: FailureReason 0xA700``) or why it said nothing (``cannot
connect to http://host:port``, ``no answer within 60 s``). Credentials go into the HTTP session
only; they are never logged or written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from medseg.errors import ConfigError
from medseg.pacs.config import PacsConfig
from medseg.pacs.contract import SEG_MANUFACTURER, PacsClient, PacsError, SeriesInfo, T, study_searches
from medseg.pacs.credentials import pacs_credentials
from medseg.pacs.dimse import DimseClient

log = logging.getLogger(__name__)

# DICOM JSON tags (PS3.18 F.2)
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
MODALITY, SERIES_NUMBER, STUDY_DATE, N_INSTANCES = "00080060", "00200011", "00080020", "00201209"
MANUFACTURER, REFERENCED_SERIES = "00080070", "00081115"


def connect(cfg: PacsConfig) -> PacsClient:
    """The client the ``pacs:`` section names: ``dicomweb_url`` (:class:`DicomWebClient`) or
    ``dimse`` (:class:`medseg.pacs.dimse.DimseClient`); the config refuses both at once."""
    if cfg.dicomweb_url is not None and cfg.dimse is not None:
        raise ConfigError("pacs: set one of pacs.dicomweb_url and pacs.dimse, not both")
    if cfg.dicomweb_url is not None:
        return DicomWebClient(cfg)
    if cfg.dimse is not None:
        return DimseClient(cfg)
    raise ConfigError("pacs: set pacs.dicomweb_url (e.g. --set pacs.dicomweb_url=http://pacs:8042/dicom-web) "
                      "or pacs.dimse {host, port, called_ae}")


def json_value(item: dict[str, Any], tag: str, default: Any = "") -> Any:
    """The first value of ``tag`` in a DICOM JSON object (``default`` when absent or empty)."""
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else default


def _http_status(exc: Exception, url: str, timeout_s: float) -> str:
    """What a failed HTTP request says, in one line (no credentials: they are not in the URL)."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        body = (exc.response.text or "").strip().replace("\n", " ")
        return f"HTTP {exc.response.status_code} {exc.response.reason}" + (f" ({body[:200]})" if body else "")
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout_s:g} s from {url}"
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect to {url}"
    return f"{type(exc).__name__}: {exc}"


class DicomWebClient:
    """QIDO-RS / WADO-RS / STOW-RS under ``cfg.dicomweb_url`` (``dicomweb-client``; its own
    retries are off: :func:`.contract.with_retries` decides)."""

    def __init__(self, cfg: PacsConfig) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        assert cfg.dicomweb_url is not None
        self.url = cfg.dicomweb_url
        self.timeout_s = cfg.timeout_s
        self.description = f"DICOMweb {self.url}"
        session = requests.Session()
        credentials = pacs_credentials(cfg)
        if credentials is not None:
            session.auth = credentials
        self._client = DICOMwebClient(self.url, session=session, timeout=cfg.timeout_s)
        self._client.set_http_retry_params(retry=False)

    def _call(self, action: str, call: Callable[[], T]) -> T:
        import requests

        try:
            return call()
        except requests.RequestException as exc:
            raise PacsError(action, _http_status(exc, self.url, self.timeout_s)) from None

    def find_series(self, query: PacsConfig, modalities: Iterable[str]) -> list[SeriesInfo]:
        wanted = set(modalities)
        studies = self._studies(query)
        found: list[SeriesInfo] = []
        for study in studies:
            study_uid = json_value(study, STUDY_UID)
            rows = self._call("QIDO-RS series query", lambda uid=study_uid: self._client.search_for_series(
                uid, fields=["NumberOfSeriesRelatedInstances", "SeriesNumber"], get_remaining=True))  # fmt: skip
            for row in rows:
                modality = str(json_value(row, MODALITY))
                if modality not in wanted:
                    continue
                n = json_value(row, N_INSTANCES, None)
                found.append(SeriesInfo(study_uid, str(json_value(row, SERIES_UID)), modality,
                                        str(json_value(row, SERIES_NUMBER)), int(n) if n not in (None, "") else None,
                                        str(json_value(study, STUDY_DATE))))  # fmt: skip
        return sorted(found, key=lambda s: (s.study_date, s.study_uid, s.series_uid))

    def _studies(self, query: PacsConfig) -> list[dict[str, Any]]:
        base: dict[str, Any] = {"StudyDate": query.study_date} if query.study_date else {}
        if query.modality:
            base["ModalitiesInStudy"] = query.modality
        searches = study_searches(query, base)
        studies: dict[str, dict[str, Any]] = {}
        for filters in searches:
            rows = self._call("QIDO-RS study query", lambda f=filters: self._client.search_for_studies(
                search_filters=f or None, get_remaining=True))  # fmt: skip
            for row in rows:
                studies.setdefault(str(json_value(row, STUDY_UID)), row)
        if query.accession_numbers and query.study_uids:  # both given: a study must match both
            studies = {uid: row for uid, row in studies.items() if uid in set(query.study_uids)}
        return list(studies.values())

    def retrieve_series(self, series: SeriesInfo, folder: Path) -> int:
        import pydicom

        def fetch() -> int:
            n = 0
            for ds in self._client.iter_series(series.study_uid, series.series_uid):
                pydicom.dcmwrite(folder / f"{ds.SOPInstanceUID}.dcm", ds, enforce_file_format=True)
                n += 1
            return n

        return self._call("WADO-RS retrieve", fetch)

    def store(self, path: Path) -> str:
        import pydicom

        ds = pydicom.dcmread(path)
        response = self._call("STOW-RS store", lambda: self._client.store_instances([ds]))
        failed = getattr(response, "FailedSOPSequence", None) or []
        for item in failed:
            if str(getattr(item, "ReferencedSOPInstanceUID", "")) == str(ds.SOPInstanceUID) or len(failed) == 1:
                reason = getattr(item, "FailureReason", None)
                raise PacsError("STOW-RS store", f"refused: FailureReason 0x{int(reason):04X}" if reason is not None
                                else "refused (no FailureReason given)")
        stored = [str(getattr(i, "ReferencedSOPInstanceUID", "")) for i in getattr(response, "ReferencedSOPSequence", None) or []]
        if stored and str(ds.SOPInstanceUID) not in stored:
            raise PacsError("STOW-RS store", "the answer does not list the stored instance")
        return "STOW-RS: stored"

    def answered_series(self, study_uid: str) -> set[str]:
        segs = self._call("QIDO-RS SEG query", lambda: self._client.search_for_series(
            study_uid, search_filters={"Modality": "SEG"}, get_remaining=True))  # fmt: skip
        answered: set[str] = set()
        for seg in segs:
            series_uid = str(json_value(seg, SERIES_UID))
            metadata = self._call("WADO-RS SEG metadata", lambda s=series_uid: self._client.retrieve_series_metadata(
                study_uid, s))  # fmt: skip
            for instance in metadata:
                if str(json_value(instance, MANUFACTURER)) != SEG_MANUFACTURER:
                    continue
                for ref in (instance.get(REFERENCED_SERIES) or {}).get("Value") or []:
                    answered.add(str(json_value(ref, SERIES_UID)))
        return answered
