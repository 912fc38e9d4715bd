"""The PACS ledger (``pacs_ledger.csv`` in the run folder): one row per source series medseg
tried to answer, so that a series already answered is never sent twice and a killed or failed
run knows what is left.

Columns: ``series_uid`` (the source SeriesInstanceUID), ``study_uid``, ``case_id`` (the
manifest's pseudonymous id), ``seg_sop_uid`` (the SEG's SOPInstanceUID), ``status``
(:data:`STORED`, :data:`IN_PACS`: the archive already held a medseg SEG for the series,
:data:`FAILED`), ``pacs_status`` (what the PACS said), ``time`` (UTC, ISO 8601). The file is
rewritten atomically after every change, so a kill leaves the previous or the new version.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from medseg import atomic

LEDGER_FILE = "pacs_ledger.csv"
STORED, IN_PACS, FAILED = "stored", "already in PACS", "failed"
ANSWERED = (STORED, IN_PACS)


@dataclass
class LedgerRow:
    series_uid: str
    study_uid: str
    case_id: str
    seg_sop_uid: str
    status: str
    pacs_status: str
    time: str


class Ledger:
    """``pacs_ledger.csv`` at ``path``, read on creation (empty when absent)."""

    COLUMNS = tuple(LedgerRow.__dataclass_fields__)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: dict[str, LedgerRow] = {}
        if self.path.is_file():
            frame = pd.read_csv(self.path, dtype=str, keep_default_na=False)
            for record in frame.to_dict("records"):
                row = LedgerRow(**{c: str(record.get(c, "")) for c in self.COLUMNS})
                self.rows[row.series_uid] = row

    def answered(self, series_uid: str) -> bool:
        row = self.rows.get(series_uid)
        return row is not None and row.status in ANSWERED

    def record(self, series_uid: str, study_uid: str, case_id: str, seg_sop_uid: str, status: str, pacs_status: str) -> None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.rows[series_uid] = LedgerRow(series_uid, study_uid, case_id, seg_sop_uid, status, pacs_status, now)
        frame = pd.DataFrame([asdict(r) for r in self.rows.values()], columns=list(self.COLUMNS))
        atomic.write_csv(self.path, frame)
