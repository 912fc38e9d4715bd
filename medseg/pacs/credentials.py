"""PACS credentials: from ``pacs.credentials_file`` (JSON ``{"user": ..., "password": ...}``)
or the environment (``MEDSEG_PACS_USER`` and ``MEDSEG_PACS_PASSWORD``); never from the config,
never logged. No credentials: requests go without authentication."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

from medseg.errors import ConfigError
from medseg.pacs.config import PacsConfig

log = logging.getLogger(__name__)

USER_VARIABLE = "MEDSEG_PACS_USER"
PASSWORD_VARIABLE = "MEDSEG_PACS_PASSWORD"


def pacs_credentials(cfg: PacsConfig) -> tuple[str, str] | None:
    """(user, password) for the PACS, or ``None``. Raises ``ConfigError`` naming the file or
    variable that is unusable (never the values)."""
    if cfg.credentials_file:
        path = Path(cfg.credentials_file).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"pacs.credentials_file: {path}: file not found") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"pacs.credentials_file: {path}: not a readable JSON file ({type(exc).__name__})") from None
        if not isinstance(data, dict) or not isinstance(data.get("user"), str) or not isinstance(data.get("password"), str):
            raise ConfigError(f'pacs.credentials_file: {path}: expected {{"user": "...", "password": "..."}}')
        if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("pacs.credentials_file %s can be read by others; chmod 600 it", path)
        return data["user"], data["password"]
    user, password = os.environ.get(USER_VARIABLE), os.environ.get(PASSWORD_VARIABLE)
    if user is None and password is None:
        return None
    if not user or password is None:
        raise ConfigError(f"set both {USER_VARIABLE} and {PASSWORD_VARIABLE} (or neither), or pacs.credentials_file")
    return user, password
