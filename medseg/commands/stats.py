"""`medseg stats`: per-slice lesion statistics and the lesion-distribution curve of a manifest."""

from __future__ import annotations

import argparse

from medseg.commands import add_set_option

HELP = "per-slice lesion statistics, case statistics and the lesion-distribution curve"

EPILOG = """\
A case whose files are missing or unusable is recorded in OUT/failures.csv (case_id, stage,
error) and the others go on.
exit status: 0 every labelled case done; 1 some case(s) failed (failures.csv, the others
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
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it holds files this command did not write (same names replaced)")


def run(args: argparse.Namespace) -> int:
    from medseg.output_folder import claim_output_folder

    with claim_output_folder(args.out, "medseg stats", overwrite=args.overwrite):  # first: a second run on --out is refused at once
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from medseg.config import load_config
    from medseg.manifest import read_manifest

    overrides = list(args.overrides)
    if args.axis:
        overrides.append(f"stats.axis={args.axis}")
    if args.extent:
        overrides.append(f"stats.extent={args.extent}")
    cfg = load_config(args.config, overrides)
    cases = read_manifest(args.manifest, check_files=False)  # a missing file fails its case (failures.csv)
    if args.split is not None:
        cases = [c for c in cases if c.split == args.split]
    from medseg.dataset_stats import (  # torch, MONAI: after the cheap checks
        compute_dataset_stats,
        write_dataset_stats,
    )

    stats = compute_dataset_stats(cases, cfg, progress=not args.no_progress)
    paths = write_dataset_stats(stats, cfg, args.out)
    n_ok, n_fail = len(stats.cases), len(stats.failures)
    print(f"statistics of {n_ok} case(s) written to {args.out}" + (f"; {n_fail} failed (see {paths['failures']})" if n_fail else ""))
    if "lesion_curve_png" in paths:
        print(f"lesion-distribution curve: {paths['lesion_curve_png']}")
    return 1 if n_fail else 0
