"""Text files a user hands to medseg (manifests, configs, pipelines, dataset.json, model folders):
read as UTF-8, with one clear line for a file that is not (a Latin-1 export from a spreadsheet, a
binary file given by mistake) instead of a ``UnicodeDecodeError`` traceback.
:func:`read_user_yaml` / :func:`read_user_json` also parse it and raise the caller's error type
naming the file: the one place that reads, parses and names a user's file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


class NotTextError(ValueError):
    """The file is not UTF-8 text; ``str(exc)`` says why in one line (no file name)."""


def read_user_text(path: str | Path) -> str:
    """The file's text (UTF-8, a leading byte-order mark dropped). Raises ``NotTextError`` for a
    binary file (NUL bytes) or bytes that are not UTF-8, naming the line and column of the first."""
    data = Path(path).read_bytes()
    if b"\x00" in data[:65536]:
        raise NotTextError("binary file (NUL bytes), not a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        offset = exc.start + start
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        raise NotTextError(
            f"not UTF-8 text (byte 0x{data[offset]:02x} at line {line}, column {column}); "
            "save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet)"
        ) from None


def yaml_problem(exc: Exception) -> str:
    """A YAML parse error in one line: what went wrong and where (line, column)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"not valid YAML: {problem}{where}"


def read_user_yaml(path: str | Path, error: Callable[[str], Exception], *,
                   missing: str = "file not found", name: str | Path | None = None) -> Any:  # fmt: skip
    """The YAML document of a file a user hands to medseg (``yaml.safe_load`` of
    :func:`read_user_text`). Every problem raises ``error(f"{name}: {why}")`` (``error``: e.g.
    ``ConfigError``), one line: the file is missing (``why`` = ``missing``), cannot be read, is
    not UTF-8 text or not YAML (with line and column). ``name``: how the message names the file
    (default: ``path`` as given)."""
    import yaml

    return _read_parsed(path, yaml.safe_load, yaml.YAMLError, yaml_problem, error, missing, name)


def read_user_json(path: str | Path, error: Callable[[str], Exception], *,
                   missing: str = "file not found", name: str | Path | None = None) -> Any:  # fmt: skip
    """The JSON value of a file a user hands to medseg; problems as :func:`read_user_yaml`."""
    return _read_parsed(path, json.loads, json.JSONDecodeError, lambda exc: f"not valid JSON ({exc})", error, missing,
                        name)  # fmt: skip


def _read_parsed(path: str | Path, parse: Callable[[str], Any], parse_error: type[Exception],
                 problem: Callable[[Exception], str], error: Callable[[str], Exception], missing: str,
                 name: str | Path | None) -> Any:  # fmt: skip
    named = path if name is None else name
    if not Path(path).is_file():
        raise error(f"{named}: {missing}")
    try:
        return parse(read_user_text(path))
    except NotTextError as exc:
        raise error(f"{named}: {exc}") from None
    except parse_error as exc:
        raise error(f"{named}: {problem(exc)}") from None
    except OSError as exc:
        raise error(f"{named}: cannot be read ({exc.strerror or exc})") from None
