"""`medseg run PIPELINE.yaml`: run a pipeline definition stage by stage (resumable)."""

from __future__ import annotations

import argparse

from medseg.commands import add_set_option

HELP = "run a pipeline (pipelines/*.yaml): validate -> stats -> [train] -> infer -> evaluate -> report"
REPORT_FOLDERS = ("report", "stats_report")  # stages whose folder holds a report.html to point at


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", nargs="?", help="pipeline definition, e.g. pipelines/demo.yaml")
    parser.add_argument("--list-stages", action="store_true",
                        help="print every stage a pipeline file can name, in pipeline order, with one line each, and exit")
    parser.add_argument("--out", default=None, help="run folder (default runs/<name>/<timestamp>); an existing one is resumed")
    parser.add_argument("--resume", action="store_true", help="continue the newest run folder of this pipeline")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE", help="redo this stage (repeatable)")
    add_set_option(parser, "config override (train.max_minutes=2) or pipeline field (pipeline.manifest=m.csv)")
    parser.add_argument("--no-progress", action="store_true")


def list_stages() -> str:
    """Every stage of the registry (:data:`medseg.pipeline.STAGES`), in pipeline order: name,
    options and its one-line description."""
    from medseg.pipeline import STAGES

    width = max(len(name) for name in STAGES)
    lines = []
    for name, stage in STAGES.items():
        options = ", ".join(stage.options.model_fields) or "-"
        lines.append(f"{name:<{width}}  {stage.description}  [options: {options}]")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from medseg.errors import ConfigError
    from medseg.outputs import FAILURES_FILE, REPORT_PAGE
    from medseg.pipeline import choose_run_dir, load_pipeline, run_pipeline
    from medseg.run_folder import claim_output_folder

    if args.list_stages:
        print(list_stages())
        return 0
    if args.pipeline is None:
        raise ConfigError("give a pipeline file (e.g. pipelines/demo.yaml), or --list-stages for the stages one can name")
    spec, cfg, _ = load_pipeline(args.pipeline, args.overrides)
    run_dir = choose_run_dir(spec, args.out, args.resume)
    print(f"pipeline {spec.name}: run folder {run_dir}")
    with claim_output_folder(run_dir, f"medseg run {args.pipeline}"):
        run_pipeline(spec, cfg, run_dir, force=args.force, progress=not args.no_progress)
    failures = pd.read_csv(run_dir / FAILURES_FILE)
    if len(failures):
        print(f"{len(failures)} case failure(s) recorded in {run_dir / FAILURES_FILE}")
    for folder in REPORT_FOLDERS:
        if (run_dir / folder / REPORT_PAGE).is_file():
            print(f"report: {run_dir / folder / REPORT_PAGE}")
    return 0
