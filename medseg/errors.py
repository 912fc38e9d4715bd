"""Errors a user can trigger. Each message names the file/field and the problem.

The CLI prints these as one line (``error: ...``) without a traceback; anything
else that escapes is a bug.
"""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """Base class of every error caused by user input (files, manifests, configs)."""


class NothingToDo(MedsegError):
    """A pipeline stage found no work for the run (e.g. every PACS series is answered already):
    the run stops there successfully, saying why, instead of failing in a later stage."""


def printable_path(path: str | Path) -> str:
    """``path`` as text that can be printed and written to UTF-8 files: bytes of a file name that
    are not UTF-8 (surrogate escapes in Python) become ``\\xNN``."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_utf8_text(text: str | Path) -> bool:
    """True when ``text`` encodes as UTF-8: False for a file name whose bytes are not UTF-8 (it
    reaches Python as surrogate escapes), which UTF-8 files and C libraries cannot take."""
    try:
        str(text).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class InputFileError(MedsegError):
    """A volume file cannot be used: missing, corrupt, wrong dimensionality, NaN, bad labels..."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = printable_path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class GeometryMismatchError(MedsegError):
    """Two volumes that must share one voxel grid (image/label, prediction/reference) do not."""


class ManifestError(MedsegError):
    """The data manifest has one or more problems; ``problems`` lists each one.

    One problem reads as one line (``<manifest>: row N (case_id=X): ...``); several as a heading
    line and one line per problem."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"{self.path}: {problems[0]}")
            return
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{self.path}: {len(problems)} problem(s) in the manifest:\n{listing}")


class OutputError(MedsegError):
    """An output file or folder cannot be written: an existing file where a folder is needed,
    read-only, no permission, disk full, or locked by another run."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = printable_path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(MedsegError):
    """A configuration file or override is invalid (unknown key, bad value, unknown registry name)."""
