"""Atomic output files: write to a temporary file in the target folder, then rename.

A run killed mid-write leaves either the old file or none, never a truncated one; a write that
fails (disk full) is an ``OutputError`` naming the target, the temporary file removed and an
existing target untouched. A writer that may fail silently (ITK's NIfTI writer on a full disk)
verifies its temporary file inside the ``with`` block before the rename (``medseg.io``). This is the
one writer every medseg output goes through (volumes, tables, JSON, manifests, checkpoints,
cached training volumes, copies into a model folder): :func:`atomic_path` names the temporary
file ``.<stem>.partial-<pid><suffix>`` beside the target (so a reader globbing ``*.nii.gz``
never sees it, and a rerun can find and remove what a killed run left).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medseg.errors import OutputError


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes); rename it onto ``path`` on success.

    ``fsync``: flush the file to the disk before the rename (checkpoints: after a power cut the
    file is either the old one or the complete new one).

    An ``OSError`` without a file name raised while writing (``write()`` on a full disk says only
    "No space left on device") is raised again as ``OutputError`` naming ``path``. A block that
    leaves no temporary file is an error too: nothing is renamed, the target stays as it was.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(target.parent, f"cannot create the folder: {exc.strerror or exc}") from None
    suffix = "".join(target.suffixes[-2:]) if target.name.endswith(".nii.gz") else target.suffix
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    tmp = target.with_name(f".{stem}.partial-{os.getpid()}{suffix}")
    try:
        yield tmp
        if not tmp.is_file():
            raise OutputError(target, "cannot write: the writer left no file" + _kept(target))
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        if exc.filename is not None and Path(os.fsdecode(exc.filename)).name not in (tmp.name, target.name):
            raise  # about another file (an input read inside the block): its own message names it
        raise OutputError(target, f"cannot write: {os_error_reason(exc)}{_kept(target)}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def os_error_reason(exc: OSError) -> str:
    """The reason of a failed file operation in words (``ENOSPC``: "no space left on the device")."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or str(exc)


def _kept(target: Path) -> str:
    return "; the existing file is unchanged" if target.exists() else ""


FREE_SPACE_FULL = 1 << 20  # a write that failed with less than this free on its device: "disk full"


def failed_write_reason(folder: Path, problem: str, target: Path) -> str:
    """``problem`` of a write that failed without an ``OSError`` to read (a library's own error,
    or a file found incomplete afterwards), as "no space left on the device" when that is the
    cause (it says so, or ``folder``'s device has less than :data:`FREE_SPACE_FULL` free), and
    whether an existing ``target`` was kept."""
    kept = _kept(target)
    if "no space left" in problem.lower():
        return f"no space left on the device{kept}"
    try:
        stats = os.statvfs(folder)
        free = stats.f_bavail * stats.f_frsize
    except OSError:
        free = None
    if free is not None and free < FREE_SPACE_FULL:
        return f"no space left on the device ({free // 1024} KiB free){kept}"
    return f"{problem}{kept}"


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def copy_file(source: str | Path, path: str | Path) -> Path:
    """Copy ``source`` to ``path`` atomically."""
    import shutil

    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_csv(path: str | Path, frame: Any) -> Path:
    """``frame`` (a pandas DataFrame) as CSV without its index, its float columns rounded to
    what they measure (:func:`medseg.rounding.round_table`: mm to 0.01, mL to 0.0001, Dice to 4
    digits, ...)."""
    from medseg.rounding import round_table

    with atomic_path(path) as tmp:
        round_table(frame).to_csv(tmp, index=False)
    return Path(path)


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
