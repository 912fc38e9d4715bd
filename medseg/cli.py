"""`medseg <command>` entry point. Thin: each command lives in ``medseg/commands/<name>.py``.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Modules import heavy libraries inside ``run`` so that
``medseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from medseg import __version__
from medseg.errors import MedsegError
from medseg.logs import configure_console

# command name -> module path (a plain dict: the registry of CLI commands)
COMMANDS: dict[str, str] = {
    "synth": "medseg.commands.synth",
    "import": "medseg.commands.importers",
    "stats": "medseg.commands.stats",
    "plan": "medseg.commands.plan",
    "models": "medseg.commands.models",
    "export": "medseg.commands.export",
    "export-seg": "medseg.commands.export_seg",
    "evaluate": "medseg.commands.evaluate",
    "compare": "medseg.commands.compare",
    "train": "medseg.commands.train",
    "cv": "medseg.commands.cv",
    "infer": "medseg.commands.infer",
    "run": "medseg.commands.run",
    "pacs": "medseg.commands.pacs",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medseg", description="Lesion segmentation for volumetric CT and MR scans."
    )
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_path in COMMANDS.items():
        try:
            module = importlib.import_module(module_path)
        except ModuleNotFoundError as exc:  # a command whose module is not part of this build
            if exc.name == module_path:
                continue
            raise
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_console(args.verbose)
    try:
        return int(args._run(args) or 0)
    except MedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the system refused a file operation (disk full, permission, read-only)
        print(f"error: {_os_error_text(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _os_error_text(exc: OSError) -> str:
    """``<file>: <reason>`` in one line (both file names of a failed rename)."""
    from medseg.errors import printable_path

    files = [printable_path(f if isinstance(f, str) else f.decode("utf-8", "surrogateescape"))
             for f in (exc.filename, exc.filename2) if f is not None]
    reason = exc.strerror or str(exc)
    return f"{' -> '.join(files)}: {reason}" if files else reason


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
