"""`medseg evaluate`: metrics of a prediction folder against the manifest's reference labels."""

from __future__ import annotations

import argparse

from medseg import outputs
from medseg.commands import add_overwrite_option, add_set_option, run_claimed, with_shortcuts

HELP = "evaluate predicted masks against reference labels (voxel, lesion, AP/mAP, per-slice metrics)"

EPILOG = f"""\
Without --split (and evaluation.split) the cases of the manifest that have a predicted mask in
--pred are scored; labelled cases without one are counted ({outputs.EVAL_SUMMARY}: not_predicted), not
failed. With --split every labelled case of that split must have a prediction.
A case that cannot be evaluated (missing or unreadable prediction or reference, grid mismatch,
a predicted mask with non-integer values) is recorded in OUT/{outputs.FAILURES_FILE} (case_id, error)
and the others are evaluated; {outputs.EVAL_SUMMARY} counts the failed cases (n_failed).
exit status: 0 every case evaluated; 1 some case(s) failed ({outputs.FAILURES_FILE}, the others
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
        help=f"output folder: {outputs.EVAL_PER_CASE}, {outputs.EVAL_LESION_MATCHES}, {outputs.EVAL_PR_CURVE}, "
             f"{outputs.EVAL_SUMMARY}, {outputs.FAILURES_FILE}",
    )
    parser.add_argument("--config", metavar="YAML", help="config file (evaluation and data.labels sections)")
    add_set_option(parser, "config override, e.g. evaluation.matching=overlap (repeatable)")
    parser.add_argument(
        "--split",
        choices=["train", "val", "test"],
        help="evaluate only this split (same as --set evaluation.split=...)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_overwrite_option(parser)


def run(args: argparse.Namespace) -> int:
    return run_claimed(args, "medseg evaluate", _run)


def _run(args: argparse.Namespace) -> int:
    from medseg.config import dump_config, load_config
    from medseg.evaluation.runner import evaluate

    cfg = load_config(args.config, with_shortcuts(args, {"split": "evaluation.split"}))
    summary = evaluate(args.pred, args.manifest, args.out, cfg, progress=not args.no_progress,
                       skip_unpredicted=cfg.evaluation.split is None)
    dump_config(cfg, f"{args.out}/config_used.yaml")
    t = f"{cfg.evaluation.iou_threshold:g}"
    n_failed = summary["n_failed"]
    n_missing = summary["n_not_predicted"]
    print(f"evaluated {summary['n_cases']} case(s) -> {args.out}"
          + (f"; {n_failed} failed (see {args.out}/{outputs.FAILURES_FILE})" if n_failed else "")
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
