"""Output folders and files a command is about to write: checked before any work, and locked.

Every command that writes into ``--out`` first calls :func:`check_output_folder` (or
:func:`check_output_file` when ``--out`` names one file): a path that is an existing file, a
folder that cannot be created, or one medseg cannot write into is one clear error *before*
hours of computing, not a traceback after them.

Batch commands (stats, infer, evaluate, train, cv, run) then hold :class:`OutputLock` on the
folder for the whole run: ``<out>/.medseg.lock`` holds the PID, host, command and start time of
the run that owns it. A second run on the same folder is refused with that information instead
of the two deleting each other's temporary files. A lock left by a killed run (same host, PID no
longer alive) is taken over with a warning; a lock from another host cannot be checked and is
refused (remove it by hand once that run is known dead). Under ``torchrun`` only rank 0 takes
the lock (every rank of one job shares the folder).
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import socket
import sys
from pathlib import Path
from types import TracebackType

from medseg.errors import OutputError, printable_path

LOCK_NAME = ".medseg.lock"

log = logging.getLogger(__name__)


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """Create ``path`` (and parents) if needed and prove it is writable with a probe file.

    Raises ``OutputError`` naming the path when it is an existing file, cannot be created or
    cannot be written into (read-only, no permission, disk full). Returns the path.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(folder, f"{option} is an existing file, not a folder; choose a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(folder, f"{option} folder cannot be created: {_reason(exc)}") from None
    probe = folder / f".medseg-write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"medseg")
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(folder, f"{option} folder is not writable: {_reason(exc)}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return folder


def check_output_file(path: str | Path, option: str = "--out") -> Path:
    """``path`` will be (re)written: refuse an existing folder, check its folder is writable."""
    file = Path(path)
    if file.is_dir():
        raise OutputError(file, f"{option} is an existing folder; give a file path")
    check_output_folder(file.parent if str(file.parent) else Path("."), option=f"{option} ({file.name})")
    return file


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno in (errno.EROFS,):
        return "read-only file system"
    return exc.strerror or str(exc)


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class OutputLock:
    """Exclusive use of an output folder by one medseg run (module docstring). A context manager."""

    def __init__(self, folder: str | Path, command: str, created: bool = False) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.created = created  # made for this run: removed again when the run leaves it empty
        self.held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def _record(self) -> dict[str, object]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "argv": " ".join(map(printable_path, sys.argv[1:]))[:300],
                "started": dt.datetime.now().astimezone().isoformat(timespec="seconds")}

    def acquire(self) -> None:
        if _rank() != 0:
            return
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._check_existing()  # raises when the holder may be alive; else the stale lock is gone
                continue
            except OSError as exc:
                raise OutputError(self.path, f"cannot create the run lock: {_reason(exc)}") from None
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(self._record(), fh)
            except OSError as exc:  # disk full: no half-written lock stays behind
                self.path.unlink(missing_ok=True)
                raise OutputError(self.path, f"cannot write the run lock: {_reason(exc)}") from None
            self.held = True
            return
        raise OutputError(self.folder, "could not take the run lock (another run keeps taking it)")

    def _check_existing(self) -> None:
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            pid, host = int(record["pid"]), str(record["host"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError):  # half-written or foreign: older than a second -> stale
            record, pid, host = {}, -1, socket.gethostname()
        here = host == socket.gethostname()
        if here and (pid == -1 or not _pid_alive(pid)):
            log.warning("%s: taking over the lock of a run that is no longer running (pid %s, %s, started %s)",
                        printable_path(self.folder), pid, record.get("command", "?"), record.get("started", "?"))
            self.path.unlink(missing_ok=True)
            return
        who = f"pid {pid} on {'this host' if here else 'host ' + host}"
        raise OutputError(
            self.folder,
            f"another medseg run is using this output folder ({record.get('command', '?')}, {who}, started "
            f"{record.get('started', '?')}); wait for it to finish, use another --out, or delete "
            f"{LOCK_NAME} in it if that run is dead",
        )

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        if self.created:  # a refused run (bad manifest, bad config) leaves no empty folder behind
            try:
                self.folder.rmdir()
            except OSError:  # not empty: the run wrote something
                pass


def claim_output_folder(path: str | Path, command: str, option: str = "--out") -> OutputLock:
    """:func:`check_output_folder` then an (unacquired) :class:`OutputLock`: ``with claim_output_folder(out, "infer"):``.
    A folder created here is removed again when the run ends without writing into it."""
    created = not Path(path).exists()
    return OutputLock(check_output_folder(path, option), command, created=created)
