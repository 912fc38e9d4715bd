"""`medseg evaluate`: metrics of a prediction folder against the manifest's reference labels."""

from __future__ import annotations

import argparse

from medseg import outputs
from medseg.commands import add_set_option

HELP = "evaluate predicted masks against reference labels (voxel, lesion, AP/mAP, per-slice metrics)"

EPILOG = """\
Without --split (and evaluation.split) the cases of the manifest that have a predicted mask in
--pred are scored; labelled cases without one are counted (summary.json: not_predicted), not
failed. With --split every labelled case of that split must have a prediction.
A case that cannot be evaluated (missing or unreadable prediction or reference, grid mismatch,
a predicted mask with non-integer values) is recorded in OUT/failures.csv (case_id, error)
and the others are evaluated; summary.json counts the failed cases (n_failed).
exit status: 0 every case evaluated; 1 some case(s) failed (failures.csv, the others
evaluated); 2 nothing evaluated (bad arguments, config or manifest, or every case failed: one
line on stderr).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "--pred",
        required=True,
        metavar="DIR",
        help=f"prediction folder: <case_id>{outputs.MASK_SUFFIX} (+ optional {outputs.PROB_SUFFIX}, "
             f"{outputs.LESIONS_SUFFIX} / {outputs.LESIONS_CSV_SUFFIX} files)",
    )
    parser.add_argument(
        "--manifest", required=True, metavar="CSV", help="data manifest; rows with a label are evaluated"
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder: metrics_per_case.csv, lesion_matches.csv, pr_curve.csv, summary.json, failures.csv",
    )
    parser.add_argument("--config", metavar="YAML", help="config file (evaluation and data.labels sections)")
    add_set_option(parser, "config override, e.g. evaluation.matching=overlap (repeatable)")
    parser.add_argument(
        "--split",
        choices=["train", "val", "test"],
        help="evaluate only this split (same as --set evaluation.split=...)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into --out even if it holds files this command did not write (same names replaced)")


def run(args: argparse.Namespace) -> int:
    from medseg.output_folder import claim_output_folder

    with claim_output_folder(args.out, "medseg evaluate", overwrite=args.overwrite):  # first: a second run on --out is refused at once
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from medseg.config import dump_config, load_config
    from medseg.evaluation import evaluate

    overrides = list(args.overrides)
    if args.split:
        overrides.append(f"evaluation.split={args.split}")
    cfg = load_config(args.config, overrides)
    summary = evaluate(args.pred, args.manifest, args.out, cfg, progress=not args.no_progress,
                       skip_unpredicted=cfg.evaluation.split is None)
    dump_config(cfg, f"{args.out}/config_used.yaml")
    t = f"{cfg.evaluation.iou_threshold:g}"
    n_failed = summary["n_failed"]
    n_missing = summary["n_not_predicted"]
    print(f"evaluated {summary['n_cases']} case(s) -> {args.out}"
          + (f"; {n_failed} failed (see {args.out}/failures.csv)" if n_failed else "")
          + (f"; {n_missing} labelled case(s) of the manifest have no prediction in {args.pred} (not scored; "
             "--split S to require every case of split S)" if n_missing else ""))
    for name, region in summary["per_region"].items():
        print(
            f"  {name}: mean Dice {_fmt(region['voxel']['dice']['mean'])}, "
            f"global Dice {_fmt(region['voxel']['global_dice'])}, "
            f"lesion F1 {_fmt(region['lesion']['pooled']['f1'])}, AP@{t} {_fmt(region['detection']['ap'][t])}"
        )
    print(
        f"  mAP@{t} {_fmt(summary['map']['at_iou_threshold'])}, mAP over IoU {cfg.evaluation.ap_iou_thresholds} "
        f"{_fmt(summary['map']['mean_over_thresholds'])} (score source: {summary['score_source']})"
    )
    return 1 if n_failed else 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
