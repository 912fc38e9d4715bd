"""`medseg compare`: accuracy of two or more runs on the same patients (paired, patient bootstrap)."""

from __future__ import annotations

import argparse

HELP = "compare runs' accuracy on the same patients: paired differences, patient-bootstrap intervals, wins / losses"

EPILOG = """\
A run is a pipeline run folder or a medseg cv / medseg evaluate output folder: its
cv/cv_table.csv, cv_table.csv, evaluate/metrics_per_case.csv or metrics_per_case.csv (first
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
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it holds files this command did not write (same names replaced)")


def run(args: argparse.Namespace) -> int:
    from medseg.comparison import ComparisonError

    if len(args.runs) < 2:
        raise ComparisonError("give at least two run folders to compare (the first is the baseline)")
    if args.out is None:
        return _run(args)
    from medseg.output_folder import claim_output_folder

    with claim_output_folder(args.out, "medseg compare", overwrite=args.overwrite):  # first: a busy or foreign --out is refused at once
        return _run(args)


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
