"""CLI command modules: each defines HELP, add_arguments(parser) and run(args) -> int."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_set_option(parser: argparse.ArgumentParser, help: str, metavar: str = "KEY=VALUE") -> None:
    """The repeatable ``--set KEY=VALUE`` config override every command shares (into ``args.overrides``)."""
    parser.add_argument("--set", action="append", default=[], metavar=metavar, dest="overrides", help=help)


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    """The ``--overwrite`` every command writing into ``--out`` shares (``medseg.run_folder``)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it holds files this command did not write (same names replaced)")


def with_shortcuts(args: argparse.Namespace, shortcuts: dict[str, str]) -> list[str]:
    """``args.overrides`` (``--set``) followed by ``KEY=VALUE`` for each shortcut option given:
    ``{"split": "evaluation.split"}`` turns ``--split test`` into ``evaluation.split=test``."""
    given = [(key, getattr(args, name)) for name, key in shortcuts.items() if getattr(args, name) is not None]
    return [*args.overrides, *(f"{key}={value}" for key, value in given)]


def run_claimed(args: argparse.Namespace, command: str, body: Callable[[argparse.Namespace], int]) -> int:
    """``body(args)`` holding ``args.out`` for ``command`` (:func:`medseg.run_folder.claim_output_folder`),
    claimed first: a second run on the same ``--out`` or a foreign folder is refused at once."""
    from medseg.run_folder import claim_output_folder

    with claim_output_folder(args.out, command, overwrite=args.overwrite):
        return body(args)
