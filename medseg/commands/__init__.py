"""CLI command modules: each defines HELP, add_arguments(parser) and run(args) -> int."""

from __future__ import annotations

import argparse


def add_set_option(parser: argparse.ArgumentParser, help: str, metavar: str = "KEY=VALUE") -> None:
    """The repeatable ``--set KEY=VALUE`` config override every command shares (into ``args.overrides``)."""
    parser.add_argument("--set", action="append", default=[], metavar=metavar, dest="overrides", help=help)
