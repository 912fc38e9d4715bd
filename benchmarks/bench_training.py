"""Training throughput: the full pipeline (cached volumes -> 2.5D stacks -> augmentation ->
DataLoader workers -> optimiser step) against the optimiser step alone on pre-made tensors.

Both use the same ``Trainer`` (model, batch, AMP, threads, channels_last, loss, optimiser) built
from a config on the manifest's training cases (:func:`medseg.engine.throughput.training_batches`);
the baseline repeats one batch already in memory. Blocks of ``--steps`` steps
alternate (baseline, pipeline, baseline, ...) ``--rounds`` times so that load from other jobs on
a shared machine hits both alike; the median block throughput of each is reported, and
``ratio`` = pipeline / step alone (1.0 = the data pipeline is hidden behind compute).

    .venv/bin/python benchmarks/bench_training.py                      # BraTS config (needs the cache/manifest)
    .venv/bin/python benchmarks/bench_training.py --config configs/demo.yaml --set train.num_workers=0
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from itertools import cycle

import torch

from medseg.config import load_config
from medseg.engine.setup import check_training_setup
from medseg.engine.throughput import training_batches
from medseg.engine.trainer import Trainer


def block(trainer: Trainer, batches, steps: int, device: torch.device) -> float:
    """Slices per second of ``steps`` optimiser steps on the next batches of ``batches``."""
    start = time.perf_counter()
    n = 0
    for _ in range(steps):
        batch = next(batches)
        trainer.step(trainer.model, batch, device)
        n += batch["image"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/brats_unet_inception.yaml")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per timed block")
    parser.add_argument("--rounds", type=int, default=3, help="timed blocks of each kind")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (AMP/channels_last follow the config)")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    cases = check_training_setup(cfg)
    t = cfg.train
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    device = torch.device(args.device)
    n_batches = 1 + args.warmup + args.steps * args.rounds  # every block from one loader iterator
    with training_batches(cfg, cases, device, n_batches) as (trainer, pipeline):
        fixed = next(pipeline)
        made = cycle([fixed])
        block(trainer, made, args.warmup, device)
        block(trainer, pipeline, args.warmup, device)
        step_alone, full = [], []
        for _ in range(args.rounds):
            step_alone.append(block(trainer, made, args.steps, device))
            full.append(block(trainer, pipeline, args.steps, device))
    a, b = statistics.median(step_alone), statistics.median(full)
    print(f"date (UTC): {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"config: {args.config} {' '.join(args.overrides)}")
    print(f"model: {cfg.model.arch}/{cfg.model.encoder} width {cfg.model.width}, in_channels {cfg.model.in_channels}, "
          f"batch {t.batch_size} x {t.patch_size[0]}x{t.patch_size[1]}, amp {trainer.amp}, threads {t.threads}, "
          f"workers {t.num_workers}")  # fmt: skip
    print(f"step alone (pre-made tensors): {a:.1f} slices/s  blocks {[round(v, 1) for v in step_alone]}")
    print(f"full pipeline:                 {b:.1f} slices/s  blocks {[round(v, 1) for v in full]}")
    print(f"ratio pipeline / step alone:   {b / a:.2f}")


if __name__ == "__main__":
    main()
