"""`medseg run PIPELINE.yaml`: run a pipeline definition stage by stage (resumable)."""

from __future__ import annotations

import argparse

from medseg.commands import add_set_option

HELP = "run a pipeline (pipelines/*.yaml): validate -> stats -> [train] -> infer -> evaluate -> report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="pipeline definition, e.g. pipelines/demo.yaml")
    parser.add_argument("--out", default=None, help="run folder (default runs/<name>/<timestamp>); an existing one is resumed")
    parser.add_argument("--resume", action="store_true", help="continue the newest run folder of this pipeline")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE", help="redo this stage (repeatable)")
    add_set_option(parser, "config override (train.max_minutes=2) or pipeline field (pipeline.manifest=m.csv)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from medseg.output_folder import claim_output_folder
    from medseg.outputs import FAILURES_FILE
    from medseg.pipeline import choose_run_dir, load_pipeline, run_pipeline

    spec, cfg, _ = load_pipeline(args.pipeline, args.overrides)
    run_dir = choose_run_dir(spec, args.out, args.resume)
    print(f"pipeline {spec.name}: run folder {run_dir}")
    with claim_output_folder(run_dir, f"medseg run {args.pipeline}"):
        run_pipeline(spec, cfg, run_dir, force=args.force, progress=not args.no_progress)
    failures = pd.read_csv(run_dir / FAILURES_FILE)
    report = run_dir / "report" / "report.html"
    if len(failures):
        print(f"{len(failures)} case failure(s) recorded in {run_dir / 'failures.csv'}")
    if report.is_file():
        print(f"report: {report}")
    return 0
