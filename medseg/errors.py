"""Errors a user can trigger. Each message names the file/field and the problem.

The CLI prints these as one line (``error: ...``) without a traceback; anything
else that escapes is a bug.
"""

from __future__ import annotations

from pathlib import Path


class MedsegError(Exception):
    """Base class of every error caused by user input (files, manifests, configs)."""


class InputFileError(MedsegError):
    """A volume file cannot be used: missing, corrupt, wrong dimensionality, NaN, bad labels..."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class GeometryMismatchError(MedsegError):
    """Two volumes that must share one voxel grid (image/label, prediction/reference) do not."""


class ManifestError(MedsegError):
    """The data manifest has one or more problems; ``problems`` lists each one."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        listing = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{self.path}: {len(problems)} problem(s) in the manifest:\n{listing}")


class ConfigError(MedsegError):
    """A configuration file or override is invalid (unknown key, bad value, unknown registry name)."""
