"""`medseg distill MODEL_DIR --manifest POOL.csv`: one student network distilled from a model
folder's fold ensemble, checked out-of-fold against it."""

from __future__ import annotations

import argparse

from medseg.commands import add_set_option
from medseg.outputs import DISTILL_RECORD, STUDENT_DIR

HELP = "distil a model folder's fold ensemble into one network, checked out-of-fold against the ensemble"

EPILOG = f"""\
For each cross-validation fold k a student learns the probabilities of fold k's own model(s) on
fold k's training patients only, and is scored (Dice, the folder's post-processing) on fold k's
held-out patients; the ensemble's out-of-fold Dice on the same patients comes from the folder's
cross-validation. Then one student learns the whole ensemble on every pool patient (and the
--unlabeled cases) and is written to MODEL_DIR/{STUDENT_DIR}/; MODEL_DIR/{DISTILL_RECORD} records
the comparison (paired per patient, 95 % bootstrap interval) and use_student: true only when the
students' mean Dice >= the ensemble's - distill.margin (default 0.005).
  --set distill.margin=0.01   --set model.width=0.5 (a narrower student)   --set train.epochs=20
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("model", metavar="MODEL_DIR", help="model folder (pipelines/auto.yaml's model/)")
    parser.add_argument("--manifest", required=True, metavar="POOL.csv",
                        help="the manifest the model folder was cross-validated on (its pool = folds.json's)")
    parser.add_argument("--unlabeled", metavar="UNLABELED.csv", help="further cases (labels not needed) for the shipped student")
    parser.add_argument("--minutes", type=float, metavar="M", help="training time budget per student (distill.minutes)")
    parser.add_argument("--work", metavar="DIR", help="keep the fold students, their predictions and scores here "
                                                       "(default: a temporary folder, removed)")  # fmt: skip
    add_set_option(parser, "distill.<key>, or the student's model.<key> / train.<key> (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    from medseg.auto.distill import run_distillation

    overrides = [*args.overrides, *([f"distill.minutes={args.minutes}"] if args.minutes is not None else [])]
    result = run_distillation(args.model, args.manifest, args.unlabeled, overrides, args.work, progress=not args.no_progress)
    check = result.record["check"]
    ci = check["paired_difference"]["ci95"]
    interval = f" (95 % CI over patients {ci[0]:+.4f} to {ci[1]:+.4f})" if ci else ""
    print(f"students out-of-fold Dice {check['students_mean_dice']:.4f} vs ensemble {check['ensemble_mean_dice']:.4f} "
          f"over {check['n_cases']} case(s): difference {check['paired_difference']['mean']:+.4f}{interval}; "
          f"use_student {str(result.record['use_student']).lower()}; {result.record_path}")  # fmt: skip
    for failure in result.failures:
        print(f"failed: {failure['case_id']}: {failure['error']}")
    return 1 if result.failures else 0
