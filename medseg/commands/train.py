"""`medseg train CONFIG [--set k=v] [--resume] [--out DIR]`: 2.5D training (DDP under torchrun)."""

from __future__ import annotations

import argparse

from medseg.commands import add_set_option

HELP = "train a 2D/2.5D segmentation model on the manifest's train split (torchrun for several processes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="YAML config (sections data, preprocess, model, train, ...)")
    add_set_option(parser, "config override, e.g. train.epochs=50 (repeatable)")
    parser.add_argument("--out", metavar="DIR", help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medseg.config import load_config
    from medseg.engine import train

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).name.split(".")[0]
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    best = f"{result.best_metric:.4f} at epoch {result.best_epoch}" if result.best_epoch else "n/a"
    print(
        f"trained {result.epochs_done} epoch(s) (stopped: {result.stop_reason}); best val Dice {best}; "
        f"checkpoints in {result.out_dir}"
    )
    return 0
