"""Progress bars on a terminal only: every ``tqdm`` in medseg asks :func:`progress_enabled`.

A bar redrawn with ``\\r`` is unreadable in a redirected log (``medseg train ... 2> train.log``
wrote 108 bar frames for 2 epochs); there the commands' own log lines (one per epoch, one per
case) are the progress. A Jupyter kernel's stderr is no terminal, but ``tqdm.auto`` draws a
widget there, so bars stay on in a notebook.
"""

from __future__ import annotations

import sys
from typing import TextIO


def progress_enabled(requested: bool = True, stream: TextIO | None = None) -> bool:
    """True when bars were ``requested`` and ``stream`` (default: ``sys.stderr``, where tqdm
    draws) is a terminal or a notebook's output."""
    if not requested:
        return False
    target = sys.stderr if stream is None else stream
    if type(target).__module__.startswith("ipykernel"):
        return True
    try:
        return bool(target.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
