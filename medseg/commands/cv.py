"""`medseg cv CONFIG [--out DIR]`: k-fold cross-validation (every fold, out-of-fold predictions, CV table)."""

from __future__ import annotations

import argparse

from medseg.commands import add_overwrite_option, add_set_option
from medseg.outputs import CV_SUMMARY, CV_TABLE

HELP = "cross-validate a config: train every patient-level fold, predict each held-out patient, score them"

EPILOG = f"""\
Trains cv.folds models (each on the other folds), predicts every labelled non-test patient once with
the model that did not see it, and writes DIR/{CV_TABLE} and DIR/{CV_SUMMARY} (out-of-fold
Dice, HD95, lesion F1). Re-running resumes: finished folds and predicted cases are skipped.
Under torchrun each rank trains its own folds (rank r: folds r, r+W, ...) on its own GPU:
  torchrun --nproc-per-node 4 -m medseg.cli cv CONFIG --out DIR
medseg run pipelines/auto.yaml does this after planning the config, then chooses the
post-processing on the out-of-fold predictions and writes a model folder.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("config", metavar="CONFIG", help="YAML config (e.g. a plan from medseg plan)")
    add_set_option(parser, "config override, e.g. cv.folds=3 (repeatable)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: runs/<config name>/cv)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_overwrite_option(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medseg.auto.cross_validation import run_cross_validation
    from medseg.config import load_config
    from medseg.run_folder import claim_output_folder

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).name.split(".")[0] / "cv"
    with claim_output_folder(out, "medseg cv", overwrite=args.overwrite):
        result = run_cross_validation(cfg, cfg.data.manifest, out, progress=not args.no_progress)
    if not result.summary:  # a torchrun rank other than 0
        return 0
    metrics = result.summary["metrics"]
    dice, hd95 = metrics["dice"], metrics.get("hd95_mm", {})
    ci = dice.get("ci95")
    interval = f" (95 % CI over patients {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
    print(f"out-of-fold over {result.summary['n_cases']} case(s), {result.folds.n_folds} folds: mean Dice "
          f"{dice['mean']:.4f}{interval} (median {dice['median']:.4f}), HD95 {hd95.get('mean', float('nan')):.2f} mm; "
          f"{out / CV_SUMMARY}")  # fmt: skip
    for failure in result.failures:
        print(f"failed: {failure['case_id']}: {failure['error']}")
    return 1 if result.failures else 0
