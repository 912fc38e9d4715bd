"""The :class:`~medseg.pacs.client.PacsClient` contract over DIMSE (``pynetdicom``), for an
archive without DICOMweb: ``pacs.dimse: {host, port, called_ae, calling_ae}``.

=====================================  ==========================================================
``find_series``                        C-ECHO (the connection check), then C-FIND in the Study
                                       Root model: STUDY level (StudyDate, ModalitiesInStudy,
                                       one search per AccessionNumber / StudyInstanceUID as the
                                       DICOMweb client does), then SERIES level per study
``retrieve_series``                    C-FIND at IMAGE level (the series' SOP classes), then
                                       C-GET of the series on one association that also
                                       negotiates the Storage SCP role for those classes (and
                                       CT/MR image storage); each instance received is written
                                       as ``<SOPInstanceUID>.dcm`` into the folder
``store``                              C-STORE (Segmentation Storage, the file's transfer syntax)
``answered_series``                    C-FIND at SERIES level for Modality SEG in the study, then
                                       per SEG series C-FIND at IMAGE level for Manufacturer and
                                       ReferencedSeriesSequence; an archive that does not return
                                       the sequence in C-FIND answers: the SEG instances are
                                       fetched with C-GET and their headers read (the DICOMweb
                                       client reads the same attributes from WADO-RS metadata)
=====================================  ==========================================================

C-GET, unlike C-MOVE, sends the instances back on medseg's own association: the archive does
not need medseg's host and port, only to allow C-GET (and C-FIND, C-STORE) from the
``calling_ae`` (Orthanc: ``DicomModalities`` or ``DicomAlwaysAllowGet``). One association per
call; :func:`~medseg.pacs.client.with_retries` repeats a failed call. Every failure is a
:class:`~medseg.pacs.client.PacsError` whose status reads like the DICOMweb client's HTTP
statuses: ``cannot connect to host:port``, ``association rejected by AE@host:port (...)``,
``refused: status 0xA700 (Refused: Out of Resources)``, ``no answer within 60 s ...``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medseg.pacs.config import PacsConfig
from medseg.pacs.contract import SEG_MANUFACTURER, PacsError, SeriesInfo, study_searches

log = logging.getLogger(__name__)

# Storage classes always offered for the C-GET SCP role (the query adds the series' own)
CT_MR_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
)
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2)

PENDING = (0xFF00, 0xFF01)
WARNING_STORE = (0x0001, 0xB000, 0xB006, 0xB007)  # stored, with a coercion / element warning


def _status_text(code: int, table: dict[int, tuple[str, str]]) -> str:
    meaning = table.get(code, ("", ""))[1]
    return f"status 0x{code:04X}" + (f" ({meaning})" if meaning else "")


class DimseClient:
    """C-ECHO / C-FIND / C-GET / C-STORE with ``cfg.dimse`` (timeouts: ``cfg.timeout_s``)."""

    def __init__(self, cfg: PacsConfig) -> None:
        assert cfg.dimse is not None
        self.host, self.port = cfg.dimse.host, cfg.dimse.port
        self.called_ae, self.calling_ae = cfg.dimse.called_ae, cfg.dimse.calling_ae
        self.timeout_s = cfg.timeout_s
        self.where = f"{self.called_ae}@{self.host}:{self.port}"
        self.description = f"DIMSE {self.where} (as {self.calling_ae})"
        # pynetdicom logs each association (INFO) and each failure (ERROR, once per retry); the
        # failure reaches medseg's log and failures.csv as the PacsError's status instead
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)

    # -- associations --------------------------------------------------------------------------

    @contextmanager
    def _association(self, action: str, contexts: Iterable[tuple[str, list[str] | None]],
                     scp_roles: Iterable[str] = (), handlers: list | None = None) -> Iterator[Any]:  # fmt: skip
        """An established association proposing ``contexts`` ((abstract syntax, transfer syntaxes
        or None for the defaults)), with the SCP role asked for ``scp_roles`` (C-GET); released
        (or aborted after an error) on exit."""
        from pydicom.uid import UID
        from pynetdicom import AE, build_role, evt

        contexts, ae = list(contexts), AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout_s
        for abstract, syntaxes in contexts:
            if syntaxes is None:
                ae.add_requested_context(abstract)
            else:
                ae.add_requested_context(abstract, syntaxes)
        opened: list[bool] = []
        handlers = [*(handlers or []), (evt.EVT_CONN_OPEN, lambda event: opened.append(True))]
        roles = [build_role(uid, scp_role=True) for uid in scp_roles]
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae, ext_neg=roles or None,
                             evt_handlers=handlers)  # fmt: skip
        if not assoc.is_established:
            raise PacsError(action, self._why_not(assoc, bool(opened)))
        # the services medseg calls must be accepted (a storage class refused for the C-GET role
        # only fails the instances of that class, counted by the C-GET's answer)
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        roles_only = set(scp_roles)
        missing = [UID(a).name for a, _ in contexts if a not in roles_only and a not in accepted]
        if missing:
            assoc.release()
            raise PacsError(action, f"{self.where} does not accept {', '.join(dict.fromkeys(missing))}")
        try:
            yield assoc
        except BaseException:
            assoc.abort()
            raise
        else:
            assoc.release()

    def _why_not(self, assoc: Any, connected: bool) -> str:
        if not connected:
            return f"cannot connect to {self.host}:{self.port}"
        if assoc.is_rejected:
            answer = assoc.acceptor.primitive
            detail = f"{answer.result_str}, {answer.source_str}: {answer.reason_str}" if answer is not None else ""
            return (f"association rejected by {self.where}" + (f" ({detail})" if detail else "")
                    + f"; check pacs.dimse.called_ae and that the PACS knows the AE title {self.calling_ae}")
        if assoc.acceptor.primitive is None:
            return f"no answer to the association request within {self.timeout_s:g} s from {self.where}"
        return f"association aborted by {self.where} (none of the proposed presentation contexts accepted?)"

    def _lost(self) -> str:
        return f"no answer within {self.timeout_s:g} s from {self.where}, or the association was aborted"

    # -- C-FIND --------------------------------------------------------------------------------

    def _find(self, assoc: Any, action: str, level: str, keys: dict[str, Any]) -> list[Any]:
        """The identifiers a Study Root C-FIND at ``level`` answers (``keys``: matching and
        return keys, ``""`` = return only)."""
        from pydicom import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
        from pynetdicom.status import QR_FIND_SERVICE_CLASS_STATUS

        query = Dataset()
        query.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(query, keyword, value)
        found = []
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code is None:
                raise PacsError(action, self._lost())
            if code in PENDING:
                if identifier is not None:
                    found.append(identifier)
            elif code != 0x0000:
                raise PacsError(action, f"refused: {_status_text(code, QR_FIND_SERVICE_CLASS_STATUS)}")
        return found

    def _find_contexts(self) -> list[tuple[str, list[str] | None]]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

        return [(Verification, None), (StudyRootQueryRetrieveInformationModelFind, None)]

    def echo(self) -> str:
        """C-ECHO: does the archive answer ``calling_ae``?"""
        with self._association("C-ECHO", self._find_contexts()[:1]) as assoc:
            return self._echo(assoc)

    def _echo(self, assoc: Any) -> str:
        from pynetdicom.status import VERIFICATION_SERVICE_CLASS_STATUS

        code = getattr(assoc.send_c_echo(), "Status", None)
        if code is None:
            raise PacsError("C-ECHO", self._lost())
        if code != 0x0000:
            raise PacsError("C-ECHO", f"refused: {_status_text(code, VERIFICATION_SERVICE_CLASS_STATUS)}")
        return "C-ECHO: success"

    def find_series(self, query: PacsConfig, modalities: Iterable[str]) -> list[SeriesInfo]:
        wanted = set(modalities)
        found: list[SeriesInfo] = []
        with self._association("C-FIND", self._find_contexts()) as assoc:
            self._echo(assoc)
            for study in self._studies(assoc, query):
                study_uid = str(study.StudyInstanceUID)
                rows = self._find(assoc, "C-FIND series", "SERIES", {
                    "StudyInstanceUID": study_uid, "SeriesInstanceUID": "", "Modality": "", "SeriesNumber": "",
                    "NumberOfSeriesRelatedInstances": ""})  # fmt: skip
                for row in rows:
                    modality = str(row.get("Modality", ""))
                    if modality not in wanted:
                        continue
                    n = row.get("NumberOfSeriesRelatedInstances", None)
                    found.append(SeriesInfo(study_uid, str(row.SeriesInstanceUID), modality,
                                            str(row.get("SeriesNumber", "") or ""), int(n) if n not in (None, "") else None,
                                            str(study.get("StudyDate", "") or "")))  # fmt: skip
        return sorted(found, key=lambda s: (s.study_date, s.study_uid, s.series_uid))

    def _studies(self, assoc: Any, query: PacsConfig) -> list[Any]:
        """As :meth:`DicomWebClient._studies`: one search per accession number (else per study
        UID), AND of the other settings; both lists given: a study must match both."""
        base: dict[str, Any] = {"StudyInstanceUID": "", "StudyDate": query.study_date or "",
                                "ModalitiesInStudy": query.modality or "", "AccessionNumber": ""}  # fmt: skip
        searches = study_searches(query, base)
        studies: dict[str, Any] = {}
        for keys in searches:
            for row in self._find(assoc, "C-FIND study", "STUDY", keys):
                studies.setdefault(str(row.StudyInstanceUID), row)
        if query.accession_numbers and query.study_uids:
            studies = {uid: row for uid, row in studies.items() if uid in set(query.study_uids)}
        return list(studies.values())

    # -- C-GET ---------------------------------------------------------------------------------

    def _instances(self, study_uid: str, series_uid: str, extra: dict[str, Any] | None = None) -> list[Any]:
        with self._association("C-FIND instances", self._find_contexts()[1:]) as assoc:
            return self._find(assoc, "C-FIND instances", "IMAGE", {
                "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "SOPInstanceUID": "",
                "SOPClassUID": "", **(extra or {})})  # fmt: skip

    def _get(self, action: str, study_uid: str, series_uid: str, sop_classes: Iterable[str], folder: Path) -> int:
        """C-GET of one series into ``folder``; returns the number of instances written."""
        from pydicom import Dataset
        from pynetdicom import ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
        from pynetdicom.status import QR_GET_SERVICE_CLASS_STATUS

        classes = list(dict.fromkeys([*sop_classes, *CT_MR_STORAGE]))[: MAX_CONTEXTS - 1]
        written: list[str] = []

        def on_store(event: Any) -> int:
            sop_uid = str(event.request.AffectedSOPInstanceUID)
            (folder / f"{sop_uid}.dcm").write_bytes(event.encoded_dataset())
            written.append(sop_uid)
            return 0x0000

        contexts = [(StudyRootQueryRetrieveInformationModelGet, None), *((c, ALL_TRANSFER_SYNTAXES) for c in classes)]
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID, query.SeriesInstanceUID = study_uid, series_uid
        with self._association(action, contexts, classes, [(evt.EVT_C_STORE, on_store)]) as assoc:
            for status, _identifier in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
                code = getattr(status, "Status", None)
                if code is None:
                    raise PacsError(action, self._lost())
                if code in PENDING:
                    continue
                failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
                if code != 0x0000 or failed:
                    raise PacsError(action, f"refused: {_status_text(code, QR_GET_SERVICE_CLASS_STATUS)}"
                                    + (f", {failed} instance(s) not sent" if failed else ""))  # fmt: skip
        return len(written)

    def retrieve_series(self, series: SeriesInfo, folder: Path) -> int:
        classes = {str(i.get("SOPClassUID", "")) for i in self._instances(series.study_uid, series.series_uid)}
        return self._get("C-GET", series.study_uid, series.series_uid, sorted(c for c in classes if c), folder)

    # -- C-STORE -------------------------------------------------------------------------------

    def store(self, path: Path) -> str:
        import pydicom
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

        ds = pydicom.dcmread(path)
        syntax = str(ds.file_meta.TransferSyntaxUID)
        syntaxes = list(dict.fromkeys([syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        with self._association("C-STORE", [(str(ds.SOPClassUID), syntaxes)]) as assoc:
            code = getattr(assoc.send_c_store(ds), "Status", None)
        if code is None:
            raise PacsError("C-STORE", self._lost())
        if code != 0x0000 and code not in WARNING_STORE:
            raise PacsError("C-STORE", f"refused: {_status_text(code, STORAGE_SERVICE_CLASS_STATUS)}")
        return "C-STORE: stored" + (f" with warning 0x{code:04X}" if code else "")

    # -- medseg SEGs in the archive ------------------------------------------------------------

    def answered_series(self, study_uid: str) -> set[str]:
        with self._association("C-FIND SEG", self._find_contexts()[1:]) as assoc:
            segs = self._find(assoc, "C-FIND SEG", "SERIES",
                              {"StudyInstanceUID": study_uid, "SeriesInstanceUID": "", "Modality": "SEG"})
        answered: set[str] = set()
        for seg in segs:
            series_uid = str(seg.SeriesInstanceUID)
            instances = self._instances(study_uid, series_uid, {"Manufacturer": "", "ReferencedSeriesSequence": []})
            if instances and all("ReferencedSeriesSequence" in i and len(i.ReferencedSeriesSequence) for i in instances):
                headers = instances
            else:  # the archive does not return the sequence in C-FIND: read the SEGs themselves
                log.debug("pacs: %s left ReferencedSeriesSequence out of C-FIND; reading SEG series %s",
                          self.where, series_uid)
                headers = self._seg_headers(study_uid, series_uid, instances)
            for header in headers:
                if str(header.get("Manufacturer", "")) != SEG_MANUFACTURER:
                    continue
                for ref in header.get("ReferencedSeriesSequence", None) or []:
                    answered.add(str(ref.get("SeriesInstanceUID", "")))
        return answered

    def _seg_headers(self, study_uid: str, series_uid: str, instances: list[Any]) -> list[Any]:
        import pydicom

        classes = sorted({str(i.get("SOPClassUID", "")) for i in instances} - {""} | {SEGMENTATION_STORAGE})
        with tempfile.TemporaryDirectory(prefix="medseg-seg-") as tmp:
            self._get("C-GET SEG", study_uid, series_uid, classes, Path(tmp))
            return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(Path(tmp).glob("*.dcm"))]
