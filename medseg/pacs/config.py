"""The ``pacs:`` config section (:class:`PacsConfig`): where the archive is, which studies to
answer, how hard to try. Credentials never live here: :func:`medseg.pacs.credentials.pacs_credentials`
reads them from ``MEDSEG_PACS_USER`` / ``MEDSEG_PACS_PASSWORD`` or from ``credentials_file``.

Torch-free and free of medseg imports above :mod:`medseg.errors` (``medseg.config`` imports
this module, so it cannot import ``medseg.config``: its own strict base mirrors
``medseg.config.StrictModel``).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class _Strict(BaseModel):
    """Unknown keys are errors, assignments are validated (as ``medseg.config.StrictModel``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DimseConfig(_Strict):
    """A DIMSE peer (C-FIND, C-GET, C-STORE): ``host``, ``port``, the archive's AE title
    (``called_ae``) and medseg's own (``calling_ae``)."""

    host: str
    port: int = Field(ge=1, le=65535)
    called_ae: str = Field(min_length=1, max_length=16)
    calling_ae: str = Field(default="MEDSEG", min_length=1, max_length=16)


def _date(text: str, field: str) -> str:
    try:
        dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        raise ValueError(f"{field}: {text!r} is not a date YYYYMMDD") from None
    return text


class PacsConfig(_Strict):
    """Which archive medseg answers and which of its series.

    Transport: ``dicomweb_url`` (QIDO-RS / WADO-RS / STOW-RS under that root, e.g.
    ``http://pacs:8042/dicom-web``) or ``dimse`` (C-FIND / C-GET / C-STORE); one of them.

    Query (all optional, combined with AND; nothing set = every CT/MR series of the archive):
    ``study_date`` (``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD``, either end may be open),
    ``modality`` (``CT`` or ``MR``; the model's modality filters anyway),
    ``accession_numbers`` and ``study_uids`` (lists: a study matching any of them).

    ``retries``: further attempts after a failed request (a PACS that is down or refuses), each
    after ``backoff_s`` x 2^attempt seconds; ``timeout_s``: per request.
    ``credentials_file``: a JSON file ``{"user": ..., "password": ...}`` (owner-only), used
    instead of the environment variables ``MEDSEG_PACS_USER`` / ``MEDSEG_PACS_PASSWORD``.
    """

    dicomweb_url: str | None = None
    dimse: DimseConfig | None = None
    study_date: str | None = None
    modality: Literal["CT", "MR"] | None = None
    accession_numbers: list[str] = Field(default_factory=list)
    study_uids: list[str] = Field(default_factory=list)
    retries: int = Field(default=2, ge=0, le=10)
    backoff_s: float = Field(default=2.0, ge=0.0, le=300.0)
    timeout_s: float = Field(default=60.0, gt=0.0, le=3600.0)
    credentials_file: str | None = None

    @field_validator("dicomweb_url")
    @classmethod
    def _plain_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL (e.g. http://pacs:8042/dicom-web)")
        if parts.username is not None or parts.password is not None:
            raise ValueError("holds credentials; give them in MEDSEG_PACS_USER / MEDSEG_PACS_PASSWORD or "
                             "pacs.credentials_file, never in the config")
        return value.rstrip("/")

    @field_validator("study_date", mode="before")
    @classmethod
    def _date_text(cls, value: Any) -> Any:
        """``--set pacs.study_date=20260101`` reads as a YAML number: it is the date's text."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("study_date")
    @classmethod
    def _date_range(cls, value: str | None) -> str | None:
        if value is None:
            return value
        value = str(value).strip()
        if "-" not in value:
            return _date(value, "study_date")
        start, end = value.split("-", 1)
        if not start and not end:
            raise ValueError("study_date: give YYYYMMDD or YYYYMMDD-YYYYMMDD")
        if start:
            _date(start, "study_date start")
        if end:
            _date(end, "study_date end")
        if start and end and start > end:
            raise ValueError(f"study_date: the range {value!r} ends before it starts")
        return value

    @field_validator("accession_numbers", "study_uids", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        """``--set pacs.study_uids=1.2.3`` (one value) or a list; numbers read by YAML become text."""
        if value is None:
            return []
        if isinstance(value, (str, int, float)):
            value = [value]
        return [str(v) for v in value] if isinstance(value, list) else value

    @field_validator("study_uids")
    @classmethod
    def _uids(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not _UID.match(v) or len(v) > 64]
        if bad:
            raise ValueError(f"not a DICOM UID (digits and dots, at most 64 characters): {bad}")
        return value

    @model_validator(mode="after")
    def _one_transport(self) -> PacsConfig:
        if self.dicomweb_url is not None and self.dimse is not None:
            raise ValueError("set one of pacs.dicomweb_url (DICOMweb) and pacs.dimse (DIMSE), not both")
        return self

    @property
    def configured(self) -> bool:
        return self.dicomweb_url is not None or self.dimse is not None
