"""`medseg plan MANIFEST --out PLAN.yaml`: dataset fingerprint and a config planned from it."""

from __future__ import annotations

import argparse

HELP = "fingerprint a manifest's cross-validation pool and plan a full config from it (rules in medseg/plan_rules.py)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", metavar="MANIFEST", help="data_manifest.csv (test cases are never read)")
    parser.add_argument("--out", required=True, metavar="PLAN.yaml",
                        help="planned config; fingerprint.json is written beside it")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="device the plan is sized for (auto: cuda when torch sees a GPU)")
    parser.add_argument("--minutes-per-fold", type=float, default=None, metavar="M",
                        help="training time budget per cross-validation fold (default: 20 on cpu, 10 on cuda)")
    parser.add_argument("--no-measure", action="store_true",
                        help="size the epochs from the assumed throughput of the device class instead of timing "
                             "the planned model's training steps on this machine (10-30 s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medseg.auto.planning import plan_dataset
    from medseg.run_folder import check_output_file

    check_output_file(args.out)
    plan = plan_dataset(args.manifest, args.out, device=args.device, minutes_per_fold=args.minutes_per_fold,
                        progress=not args.no_progress, measure=not args.no_measure)
    print(f"plan for {args.manifest} ({plan.fingerprint['n_cases']} pool case(s), "
          f"{plan.fingerprint['n_patients']} patient(s), {plan.fingerprint['modality']}):")
    for rule in plan.rules:
        print(f"  {rule}")
    print(f"wrote {args.out} and {Path(args.out).parent / 'fingerprint.json'}")
    return 0
