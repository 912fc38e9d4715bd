"""`medseg compare`: accuracy of two or more runs on the same patients (paired, patient bootstrap)."""

from __future__ import annotations

import argparse

from medseg.commands import add_overwrite_option, run_claimed
from medseg.outputs import CV_TABLE, EVAL_PER_CASE

HELP = "compare runs' accuracy on the same patients: paired differences, patient-bootstrap intervals, wins / losses"

EPILOG = f"""\
A run is a pipeline run folder or a medseg cv / medseg evaluate output folder: its
cv/{CV_TABLE}, {CV_TABLE}, evaluate/{EVAL_PER_CASE} or {EVAL_PER_CASE} (first
found). Only the cases every run scored are compared; the first run is the baseline.
Printed: a markdown table; with --out also compare.md, compare.html (tables + figure) and
paired_differences.csv (one row per run, metric and patient).
exit status: 0 compared; 2 nothing compared (a folder without a table, fewer than 3 common
cases, an unknown metric: one line on stderr).
"""

COMPARE_MD = "compare.md"
COMPARE_HTML = "compare.html"
DIFFERENCES_CSV = "paired_differences.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders; the first is the baseline (at least two)")
    parser.add_argument("--metric", action="append", dest="metrics", metavar="NAME",
                        help="metric to compare (repeatable; default: dice, hd95_mm, lesion_f1 where every run has them)")
    parser.add_argument("--out", metavar="DIR",
                        help=f"also write {COMPARE_MD}, {COMPARE_HTML} and {DIFFERENCES_CSV} into this folder")
    add_overwrite_option(parser)


def run(args: argparse.Namespace) -> int:
    from medseg.comparison import ComparisonError

    if len(args.runs) < 2:
        raise ComparisonError("give at least two run folders to compare (the first is the baseline)")
    return _run(args) if args.out is None else run_claimed(args, "medseg compare", _run)


def _run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from medseg.atomic import write_csv, write_text
    from medseg.comparison import compare_runs, differences_table, read_run, run_labels, to_html, to_markdown

    runs = [read_run(folder, label) for folder, label in zip(args.runs, run_labels(args.runs), strict=True)]
    comparison = compare_runs(runs, args.metrics)
    markdown = to_markdown(comparison)
    print(markdown)
    if args.out is not None:
        out = Path(args.out)
        write_text(out / COMPARE_MD, markdown)
        write_csv(out / DIFFERENCES_CSV, differences_table(comparison))
        write_text(out / COMPARE_HTML, to_html(comparison))
        print(f"written: {out / COMPARE_MD}, {out / COMPARE_HTML}, {out / DIFFERENCES_CSV}", file=sys.stderr)
    return 0
