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

Taking the lock -- read an existing record, remove it when stale, create and write our own -- is
one step for the runs of this host: they take it in turn under a short :class:`filelock.FileLock`
(the guard, a file of this user's temporary folder named after the output folder's device and
inode, so nothing is written into the output folder). Without it run B could read run A's lock
between A creating it and writing the record, call the empty file stale, delete it and take the
lock too; or two runs could both take over one dead run's lock. A record that cannot be read is
stale only once it is older than :data:`UNREADABLE_STALE_S` (a run of another host, which the
guard does not reach, may be writing it).

Ownership: a command writes only into a folder that is its own. :func:`claim_output_folder`
refuses, before any work, a folder holding anything but

- nothing (a new or empty folder; the lock and temporary files of a killed run do not count),
- an earlier run of the same command: the marker ``<out>/.medseg-output.json`` names the command
  that writes into the folder (``medseg infer``; written when the run takes the folder, removed
  again if the run leaves nothing else),
- or anything, with ``overwrite`` (the commands' ``--overwrite``): the folder then becomes this
  command's.

So ``infer --out`` pointed at the labels' folder, ``stats --out`` at a training run or
``evaluate --out`` at infer's predictions is one line naming the folder, not lost files.
A pipeline run folder made before markers existed (it holds the pipeline's ``state.json``) is
its own ``medseg run``'s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from medseg.atomic import os_error_reason
from medseg.errors import OutputError, printable_path

LOCK_NAME = ".medseg.lock"
OWNER_NAME = ".medseg-output.json"
PROBE_PREFIX = ".medseg-write-probe-"
# folders written before markers existed that are recognisably a command's own: a file it writes
LEGACY_OWNER_FILES = {"medseg run": "state.json"}
GUARD_TIMEOUT_S = 60.0  # waiting for another run of this host to finish taking the lock (milliseconds, usually)
UNREADABLE_STALE_S = 5.0  # an unreadable lock record younger than this may still be being written

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
    probe = folder / f"{PROBE_PREFIX}{os.getpid()}"
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


def command_name(command: str) -> str:
    """The command a run is an instance of: its first two words (``medseg run pipelines/a.yaml``
    -> ``medseg run``); the marker names this."""
    return " ".join(command.split()[:2])


def _foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that count as content: all but the lock, the ownership marker, write
    probes and atomic temporary files (``.<stem>.partial-<pid>...``) a killed run left."""
    names = []
    for entry in os.listdir(folder):
        if entry in (LOCK_NAME, OWNER_NAME) or entry.startswith(PROBE_PREFIX) or (entry.startswith(".") and ".partial-" in entry):
            continue
        names.append(entry)
    return sorted(names)


def folder_owner(folder: str | Path) -> str | None:
    """The command the marker of ``folder`` names (``medseg infer``), or None (no or unreadable marker)."""
    try:
        record = json.loads((Path(folder) / OWNER_NAME).read_text(encoding="utf-8"))
        return str(record["command"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_output_owner(path: str | Path, command: str, overwrite: bool = False, option: str = "--out") -> Path:
    """Refuse ``path`` unless it is empty, holds an earlier run of ``command`` or ``overwrite``
    (module docstring). Raises ``OutputError`` naming the folder, what it holds and the fix."""
    folder = Path(path)
    name = command_name(command)
    if overwrite or not folder.is_dir():
        return folder
    content = _foreign_entries(folder)
    if not content:
        return folder
    owner = folder_owner(folder)
    if owner == name:
        return folder
    legacy = LEGACY_OWNER_FILES.get(name)
    if owner is None and legacy is not None and (folder / legacy).is_file():
        return folder
    shown = ", ".join(printable_path(n) for n in content[:3]) + (f" and {len(content) - 3} more" if len(content) > 3 else "")
    whose = f"the output of {owner}" if owner else f"files {name} did not write"
    raise OutputError(
        folder,
        f"{option} folder holds {whose} ({shown}); {name} writes only into an empty folder or one it "
        "wrote before: choose another (new or empty) folder, or pass --overwrite to write into this one "
        "(files of the same names are replaced)",
    )


def _reason(exc: OSError) -> str:
    return os_error_reason(exc)


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

    def __init__(self, folder: str | Path, command: str, created: bool = False, mark: bool = True) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command
        self.created = created  # made for this run: removed again when the run leaves it empty
        self.mark = mark  # write the ownership marker (OWNER_NAME) once the lock is held
        self.marked = False  # this run wrote the marker
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
        with self._guard():
            self._take()
        if self.mark:
            try:
                self._write_marker()
            except BaseException:  # disk full: no lock stays behind either
                self.release()
                raise

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Hold the FileLock that makes taking the lock one step for this host's runs (module
        docstring); without a usable temporary folder, go on unguarded (the age rule still holds)."""
        from filelock import FileLock, Timeout

        try:
            stat = self.folder.stat()
            guards = Path(tempfile.gettempdir()) / f"medseg-locks-{os.getuid() if hasattr(os, 'getuid') else 0}"
            guards.mkdir(mode=0o700, exist_ok=True)
            guard = FileLock(guards / f"{stat.st_dev}-{stat.st_ino}.lock")
            guard.acquire(timeout=GUARD_TIMEOUT_S)
        except Timeout:
            raise OutputError(self.folder, f"another medseg run of this host has been taking this output folder for "
                                           f"{GUARD_TIMEOUT_S:.0f} s; try again, or use another --out") from None  # fmt: skip
        except OSError as exc:
            log.debug("no guard for the run lock of %s: %s", printable_path(self.folder), exc)
            yield
            return
        try:
            yield
        finally:
            guard.release()

    def _take(self) -> None:
        """Create and write the lock record (under the guard), removing a stale one first."""
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

    def _write_marker(self) -> None:
        """Name this command in the folder (module docstring, ownership) unless it already is."""
        from medseg.atomic import write_json

        name = command_name(self.command)
        if folder_owner(self.folder) == name:
            return
        write_json(self.folder / OWNER_NAME, {"command": name, "run": self.command, **{
            k: v for k, v in self._record().items() if k in ("host", "started")}})
        self.marked = True

    def _check_existing(self) -> None:
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
            pid, host = int(record["pid"]), str(record["host"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError):  # foreign, or half-written by a killed run
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return
            if age < UNREADABLE_STALE_S:  # or a run of another host is writing it right now
                raise OutputError(self.folder, f"another medseg run is taking this output folder ({LOCK_NAME} is "
                                               f"{max(age, 0):.1f} s old and not written yet); try again in a few "
                                               "seconds, or use another --out") from None  # fmt: skip
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
        if self.marked and not _foreign_entries(self.folder):  # the run wrote nothing: no claim stays
            (self.folder / OWNER_NAME).unlink(missing_ok=True)
            self.marked = False
        if self.created:  # a refused run (bad manifest, bad config) leaves no empty folder behind
            try:
                self.folder.rmdir()
            except OSError:  # not empty: the run wrote something
                pass


def claim_output_folder(path: str | Path, command: str, option: str = "--out", overwrite: bool = False) -> OutputLock:
    """:func:`check_output_folder` and :func:`check_output_owner` (an empty folder, this command's
    own or ``overwrite``), then an (unacquired) :class:`OutputLock` that marks the folder as this
    command's when taken: ``with claim_output_folder(out, "medseg infer"):``. A folder created here
    is removed again when the run ends without writing into it."""
    created = not Path(path).exists()
    folder = check_output_folder(path, option)
    check_output_owner(folder, command, overwrite=overwrite, option=option)
    return OutputLock(folder, command, created=created)
