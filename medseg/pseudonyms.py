"""Keyed pseudonyms for patient identifiers (DICOM PatientID): HMAC-SHA256 with a site secret.

A plain hash of an ID is not a pseudonym: hospital IDs are short (an 8-digit ID is one of 10^8
values), so anyone can hash every candidate and look the pseudonym up in minutes. A keyed
hash (HMAC) with a secret that never leaves the site cannot be inverted that way: without the
secret, the pseudonym says nothing about the ID, and two sites (two secrets) give the same
patient unrelated pseudonyms.

The site secret (32 random bytes, hex) comes from, in this order:

1. the environment variable ``MEDSEG_SITE_SECRET`` (the hex text itself);
2. the file named by ``MEDSEG_SITE_SECRET_FILE``;
3. ``~/.config/medseg/site_secret`` (``$XDG_CONFIG_HOME/medseg/site_secret``).

When none exists, a new secret is written to the file of 2 (or 3) with owner-only permissions
(0600, its folder 0700 when created) and a warning says where: keep it (and back it up) to get the same pseudonyms for the same
patients in later imports; it is never written into any output of medseg. A secret file that
the group or others may read (or write) is refused, as ssh refuses such a private key: run
``chmod 600 FILE``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from medseg.errors import ConfigError

log = logging.getLogger(__name__)

ENV_SECRET = "MEDSEG_SITE_SECRET"
ENV_SECRET_FILE = "MEDSEG_SITE_SECRET_FILE"
PREFIX = "P"
DIGITS = 16  # hex digits kept: 64 bits, collisions negligible for any site's patient count
MIN_SECRET_BYTES = 16


def secret_file() -> Path:
    """Where the site secret is kept when it is not in the environment."""
    if os.environ.get(ENV_SECRET_FILE):
        return Path(os.environ[ENV_SECRET_FILE]).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "medseg" / "site_secret"


def _parse(text: str, source: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigError(f"{source}: the site secret must be hex text (e.g. from `python -c "
                          "\"import secrets; print(secrets.token_hex(32))\"`)") from None  # fmt: skip
    if len(key) < MIN_SECRET_BYTES:
        raise ConfigError(f"{source}: the site secret is {len(key)} bytes; use at least {MIN_SECRET_BYTES} (32 recommended)")
    return key


def _check_private(path: Path) -> None:
    """Refuse a secret file that the group or others may read or write, as ssh refuses such a
    private key: whoever reads the secret can invert the pseudonyms by trying every ID."""
    if os.name != "posix":
        return  # no POSIX modes (Windows: ACLs)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the site secret ({exc})") from None
    if mode & 0o077:
        raise ConfigError(f"{path}: the site secret file has mode {mode:04o}, so other accounts may read it and "
                          f"invert the pseudonyms; make it owner-only: chmod 600 {path}")  # fmt: skip


def site_secret(create: bool = True) -> bytes:
    """The site secret (module docstring); created on first use when ``create``."""
    if os.environ.get(ENV_SECRET):
        return _parse(os.environ[ENV_SECRET], f"${ENV_SECRET}")
    path = secret_file()
    if path.is_file():
        _check_private(path)
        try:
            return _parse(path.read_text(encoding="ascii"), str(path))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the site secret ({exc})") from None
    if not create:
        raise ConfigError(f"no site secret: set ${ENV_SECRET} or create {path}")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text + "\n")
    log.warning("created a new site secret for patient pseudonyms in %s: keep it (and back it up) to get the same "
                "pseudonyms in later imports; it never appears in medseg's outputs", path)  # fmt: skip
    return bytes.fromhex(text)


def pseudonym(identifier: str, secret: bytes | None = None) -> str:
    """``P`` + the first 16 hex digits of HMAC-SHA256(site secret, identifier)."""
    key = site_secret() if secret is None else secret
    return PREFIX + hmac.new(key, identifier.encode("utf-8"), hashlib.sha256).hexdigest()[:DIGITS]
