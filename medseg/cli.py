"""`medseg <command>` entry point. Thin: each command lives in ``medseg/commands/<name>.py``.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Modules import heavy libraries inside ``run`` so that
``medseg --help`` stays fast. A command module that cannot be imported (a missing optional
dependency, a broken install) is still listed, marked as unavailable with the import error, and
running it prints that error and exits 1; the other commands work as usual.
"""

from __future__ import annotations

import argparse
import functools
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
    "accelerate": "medseg.commands.accelerate",
    "distill": "medseg.commands.distill",
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
        except Exception as exc:  # noqa: BLE001 - any import failure: listed and explained, never a silent absence
            problem = f"cannot be loaded: {module_path} failed to import ({type(exc).__name__}: {exc})"
            cmd = sub.add_parser(name, help=f"(unavailable) {problem}", description=problem)
            cmd.set_defaults(_run=functools.partial(_unavailable, name, problem), _any_arguments=True)
            continue
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def _unavailable(name: str, problem: str, args: argparse.Namespace) -> int:
    """The ``run`` of a command whose module failed to import: the error, exit 1."""
    print(f"error: medseg {name} {problem}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_any_arguments", False):  # an unavailable command takes any arguments
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
