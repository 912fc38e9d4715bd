"""The run's files read for the reports, leniently: a missing, empty or unreadable CSV/JSON file is
None (logged when unreadable), so it drops its part of the page, never the page."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)


def read_csv(path: Path) -> pd.DataFrame | None:
    if path.is_file():
        try:
            return pd.read_csv(path, dtype={"case_id": str}, keep_default_na=True)
        except pd.errors.EmptyDataError:
            return None
    return None


def read_csv_lenient(path: Path, required: tuple[str, ...]) -> pd.DataFrame | None:
    """``path`` as a table, or None when it is missing, unreadable or lacks ``required`` columns."""
    try:
        frame = read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # pandas' ParserError is a ValueError
        log.warning("report: skipping unreadable %s (%s)", path, exc)
        return None
    if frame is None or not set(required) <= set(frame.columns):
        return None
    return frame


def read_json(path: Path) -> dict[str, Any] | None:
    """``path`` as a JSON object, or None when it is missing, unreadable or not an object."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("report: skipping unreadable %s (%s)", path, exc)
        return None
    return data if isinstance(data, dict) else None
