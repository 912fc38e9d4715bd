"""Where log lines go: the console gets medseg's own lines and everyone's warnings; a run's
``run.log`` gets every line at INFO and above, the libraries' (highdicom, MONAI...) included.

Libraries log at INFO what a user does not need to read during a batch (highdicom announces
every frame it encodes); on a terminal those lines cut into the progress bars.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

OWN_LOGGER = "medseg"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"


class ConsoleFilter(logging.Filter):
    """Passes medseg's records at the handler's level and other loggers' from WARNING up."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == OWN_LOGGER or record.name.startswith(OWN_LOGGER + ".")
        return own or record.levelno >= logging.WARNING


def configure_console(verbose: bool = False) -> None:
    """The root logger at INFO (DEBUG with ``verbose``, which also lets the libraries' lines
    through) with one console handler on stderr."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=CONSOLE_FORMAT)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(ConsoleFilter())


@contextmanager
def log_to_file(path: str | Path) -> Iterator[Path]:
    """Append every record at INFO and above (any logger) to ``path`` while the block runs."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(target, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield target
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()
