"""The planned model's training speed on the planning machine (for the epochs and, on a CPU,
``train.threads``): the one part of planning that runs the training engine.

:func:`medseg.auto.planning.plan_dataset` plans once with assumed speeds
(:mod:`medseg.auto.plan_rules`), measures that plan here and plans again with the measurement.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from medseg.auto.plan_rules import MeasuredSpeed, four_digits
from medseg.config import Config

if TYPE_CHECKING:
    from medseg.manifest import Case

MEASURE_CASES = 3
ALL_CORES_GAIN = 1.1


def measure_speed(config: Config, pool: list[Case], manifest: Path, device: Literal["cpu", "cuda"]) -> MeasuredSpeed:
    """The planned ``config``'s training speed on this machine. CPU: whole training steps with
    batches through the data pipeline on the first ``MEASURE_CASES`` cases of ``pool``
    (:func:`medseg.engine.throughput.measure_pipeline_throughput`), with 1 thread and with every
    core; every core is kept when it is ``ALL_CORES_GAIN`` x faster (the loader worker shares
    the cores, and other jobs on a shared machine slow the all-core run most). GPU: the
    optimiser step alone (:func:`medseg.engine.throughput.measure_training_throughput`)."""
    import torch

    from medseg.engine.setup import TrainingCases
    from medseg.engine.throughput import measure_pipeline_throughput, measure_training_throughput

    t = config.train
    shape = f"{t.batch_size} x {t.patch_size[0]}x{t.patch_size[1]}"
    if device == "cuda":
        return MeasuredSpeed(measure_training_throughput(config, device), f"{shape} steps of the planned model", t.threads)
    sample = TrainingCases(manifest, pool[:MEASURE_CASES], [], pool[0].channels, pool[0].modality)
    what = f"{shape} steps of the planned model, batches through the data pipeline"

    def at(threads: int | None) -> float:
        cfg = config.model_copy(deep=True)
        cfg.train.threads = threads
        return measure_pipeline_throughput(cfg, sample, device)

    one = at(1)
    cores = torch.get_num_threads()
    if cores < 2:
        return MeasuredSpeed(one, f"{what}, 1 thread", 1, " (PyTorch uses 1 core here)")
    every = at(None)
    compared = f"{four_digits(every)} slices/s with all {cores} threads vs {four_digits(one)} with 1 (measured)"
    if every >= ALL_CORES_GAIN * one:
        return MeasuredSpeed(every, f"{what}, {cores} threads", None, f" (every core: {compared})")
    return MeasuredSpeed(one, f"{what}, 1 thread", 1, f" ({compared}: under {ALL_CORES_GAIN}x)")
