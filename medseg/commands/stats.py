"""`medseg stats`: per-slice lesion statistics and the lesion-distribution curve of a manifest."""

from __future__ import annotations

import argparse

from medseg.commands import add_overwrite_option, add_set_option, run_claimed, with_shortcuts
from medseg.outputs import FAILURES_FILE, REPORT_PAGE

HELP = "per-slice lesion statistics, case statistics and the lesion-distribution curve"

EPILOG = f"""\
--report: also OUT/report/{REPORT_PAGE}, the lesion statistics report (curve, per-case table,
lesion sizes, slices with lesion). --group-by COLUMN (implies --report): a manifest column such
as site, scanner or timepoint; its groups' curves share one figure (legend "site A (n=6)").
A case whose files are missing or unusable is recorded in OUT/{FAILURES_FILE} (case_id, stage,
error) and the others go on.
exit status: 0 every labelled case done; 1 some case(s) failed ({FAILURES_FILE}, the others
done); 2 nothing ran (bad arguments, config or manifest: one line on stderr).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("manifest", help="data_manifest.csv")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config", default=None, help="YAML config (sections data, stats)")
    add_set_option(parser, "override a config value, e.g. --set stats.axis=coronal (repeatable)")
    parser.add_argument("--axis", choices=["axial", "coronal", "sagittal"], help="shortcut for --set stats.axis=...")
    parser.add_argument("--extent", choices=["foreground", "volume"], help="shortcut for --set stats.extent=...")
    parser.add_argument("--split", default=None, help="only cases of this split")
    parser.add_argument("--report", action="store_true", help=f"also write OUT/report/{REPORT_PAGE} (no model needed)")
    parser.add_argument("--group-by", default=None, metavar="COLUMN",
                        help="manifest column (e.g. site, scanner, timepoint): overlay its groups' curves (implies --report)")
    parser.add_argument("--no-progress", action="store_true")
    add_overwrite_option(parser)


def run(args: argparse.Namespace) -> int:
    return run_claimed(args, "medseg stats", _run)


def _run(args: argparse.Namespace) -> int:
    from medseg.config import load_config
    from medseg.manifest import read_manifest

    cfg = load_config(args.config, with_shortcuts(args, {"axis": "stats.axis", "extent": "stats.extent"}))
    cases = read_manifest(args.manifest, check_files=False)  # a missing file fails its case (failures.csv)
    if args.split is not None:
        cases = [c for c in cases if c.split == args.split]
    groups = None
    if args.group_by is not None:  # a missing column is refused before any case is read
        from medseg.manifest_groups import case_groups

        groups = case_groups(cases, args.group_by, args.manifest)
    from medseg.labels import require_listed_foreground
    from medseg.stats.dataset import (  # torch, MONAI: after the cheap checks
        compute_dataset_stats,
        write_dataset_stats,
    )

    stats = compute_dataset_stats(cases, cfg, progress=not args.no_progress)
    require_listed_foreground(stats.cases, cases, cfg.data.labels, "manifest")  # else an all-zero curve
    paths = write_dataset_stats(stats, cfg, args.out)
    n_ok, n_fail = len(stats.cases), len(stats.failures)
    print(f"statistics of {n_ok} case(s) written to {args.out}" + (f"; {n_fail} failed (see {paths['failures']})" if n_fail else ""))
    if "lesion_curve_png" in paths:
        print(f"lesion-distribution curve: {paths['lesion_curve_png']}")
    if args.report or groups is not None:
        from pathlib import Path

        from medseg.report.stats_page import StatsReportInputs, write_stats_report

        inputs = StatsReportInputs(Path(args.out), cases, title=f"Lesion statistics — {Path(args.manifest).name}",
                                   group_by=args.group_by, groups=groups, axis=cfg.stats.axis, extent=cfg.stats.extent,
                                   provenance={"manifest": str(Path(args.manifest).resolve())})
        print(f"report: {write_stats_report(inputs, Path(args.out) / 'report')}")
    return 1 if n_fail else 0
