"""Text files a user hands to medseg (manifests, configs, pipelines, dataset.json): read as UTF-8,
with one clear line for a file that is not (a Latin-1 export from a spreadsheet, a binary file
given by mistake) instead of a ``UnicodeDecodeError`` traceback."""

from __future__ import annotations

from pathlib import Path


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
