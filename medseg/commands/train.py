"""`medseg train CONFIG [--set k=v] [--resume] [--out DIR] [--fold K --folds N]`: 2.5D training (DDP under torchrun)."""

from __future__ import annotations

import argparse

from medseg.auto.folds import FOLDS_FILE
from medseg.commands import add_overwrite_option, add_set_option, with_shortcuts
from medseg.outputs import LAST_CHECKPOINT

HELP = "train a 2D/2.5D segmentation model on the manifest's train split (torchrun for several processes)"

EPILOG = f"""\
cross-validation:
  --fold K [--folds N]  train fold K of N patient-level folds (cv.folds, default 5) of the pool:
                        every labelled row not in the test split. Fold K's patients are held out
                        (validated every epoch for the record, never used to pick an epoch); the
                        fold's model is {LAST_CHECKPOINT}. The assignment is written once to
                        FOLDS_DIR/{FOLDS_FILE} (default: the folder above --out) and reused by every
                        fold, so all folds of one study share it. Default --out:
                        runs/<config name>/cv/fold_K.
  medseg run pipelines/auto.yaml trains every fold, predicts each held-out patient and reports
  the out-of-fold accuracy.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("config", metavar="CONFIG", help="YAML config (sections data, preprocess, model, train, ...)")
    add_set_option(parser, "config override, e.g. train.epochs=50 (repeatable)")
    parser.add_argument("--out", metavar="DIR", help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help=f"continue the run in --out from its {LAST_CHECKPOINT}")
    parser.add_argument("--fold", type=int, metavar="K", help="train cross-validation fold K (0-based; see below)")
    parser.add_argument("--folds", type=int, metavar="N", help="number of folds (cv.folds)")
    parser.add_argument("--folds-dir", metavar="DIR", help=f"folder of {FOLDS_FILE} (default: the folder above --out)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_overwrite_option(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medseg.config import load_config
    from medseg.engine import train
    from medseg.errors import ConfigError
    from medseg.run_folder import claim_output_folder

    overrides = with_shortcuts(args, {"folds": "cv.folds"})
    if args.fold is None and (args.folds is not None or args.folds_dir is not None):
        raise ConfigError("--folds/--folds-dir need --fold K")
    cfg = load_config(args.config, overrides)
    name = Path(args.config).name.split(".")[0]
    if args.fold is not None:
        if not 0 <= args.fold < cfg.cv.folds:
            raise ConfigError(f"--fold {args.fold}: folds are 0..{cfg.cv.folds - 1} (cv.folds = {cfg.cv.folds})")
        out = Path(args.out) if args.out else Path("runs") / name / "cv" / f"fold_{args.fold}"
        folds_dir = Path(args.folds_dir) if args.folds_dir else out.resolve().parent
    else:
        out = Path(args.out) if args.out else Path("runs") / name
        folds_dir = None
    # --resume of a run (its last checkpoint) is this command's own folder, marked or not (runs before markers)
    own = args.overwrite or (args.resume and (out / LAST_CHECKPOINT).is_file())
    with claim_output_folder(out, "medseg train", overwrite=own):
        result = train(cfg, out, resume=args.resume, progress=not args.no_progress, fold=args.fold, folds_dir=folds_dir)
    if args.fold is not None:
        print(f"fold {args.fold}/{cfg.cv.folds}: trained {result.epochs_done} epoch(s) (stopped: {result.stop_reason}); "
              f"fold model {result.out_dir / LAST_CHECKPOINT}; folds in {folds_dir / FOLDS_FILE}")
        return 0
    best = f"{result.best_metric:.4f} at epoch {result.best_epoch}" if result.best_epoch else "n/a"
    print(
        f"trained {result.epochs_done} epoch(s) (stopped: {result.stop_reason}); best val Dice {best}; "
        f"checkpoints in {result.out_dir}"
    )
    return 0
