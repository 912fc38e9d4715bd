"""Training throughput of a config on this machine, measured in seconds rather than assumed.

:func:`measure_training_throughput` times optimiser steps of the config's model on random
batches shaped like its training batches (``train.batch_size`` x ``model.in_channels`` x
``train.patch_size``), with the training step's settings: autocast dtype (``train.amp``),
``channels_last``, ``train.threads``, loss, optimiser and gradient clipping
(:func:`medseg.engine.optim.optimiser_step`, as the trainer's step). ``medseg plan``
turns the result into the number of epochs that fit the time budget, so a plan made on a fast
GPU, an old CPU or a bf16 CPU trains as long as that machine allows instead of as long as a
constant for its device class says.

The data pipeline is not part of that measurement: with one training thread beside one loader
worker on 2 CPU cores it is hidden behind the step (``benchmarks/bench_training.py``: pipeline /
step alone 0.99-1.03 at 160 x 192), and where it is not, the trainer's ``train.max_minutes`` fits
the learning-rate schedule to the epochs that really fit. With every core training, the loader
worker competes with the step (pipeline / step alone 0.73 on 2 cores), so
:func:`measure_pipeline_throughput` times whole training steps, batches drawn through the
trainer's own data pipeline (preprocessing, 2.5D stacks, augmentation, DataLoader workers) from
a few real cases: ``medseg plan`` uses it on CPUs to choose ``train.threads`` and the epochs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from medseg.config import Config
from medseg.engine.setup import TrainingCases
from medseg.errors import ConfigError
from medseg.model_names import is_instance_arch

if TYPE_CHECKING:
    from medseg.engine.trainer import Trainer

WARMUP_STEPS = 2
MIN_STEPS = 2
MAX_STEPS = 5
MAX_SECONDS = 30.0
PIPELINE_MIN_STEPS = 12  # more than a full prefetch queue, so the loader's pace shows
PIPELINE_MAX_STEPS = 40


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measurable_device(cfg: Config, device: str | torch.device) -> torch.device:
    """``device`` resolved (:func:`medseg.runtime.resolve_device`); ``ConfigError`` for a detection model."""
    from medseg.runtime import resolve_device

    dev = resolve_device(device)
    if is_instance_arch(cfg.model.arch):
        raise ConfigError(f"training throughput is measured for segmentation models; {cfg.model.arch} takes instance targets")
    return dev


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Torch's thread count at ``threads`` inside (``None``: as it is), restored after."""
    from medseg.runtime import set_threads

    before = torch.get_num_threads()
    set_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _slices_per_second(step: Callable[[], int], dev: torch.device, min_steps: int, max_steps: int,
                       max_seconds: float) -> float:
    """Time calls of ``step`` (one optimiser step; returns its number of slices) until
    ``max_steps`` or ``max_seconds``, at least ``min_steps``; the device is synchronised after
    each, so the clock sees the work."""
    _sync(dev)
    start = time.perf_counter()
    steps = slices = 0
    while steps < min_steps or (steps < max_steps and time.perf_counter() - start < max_seconds):
        slices += step()
        _sync(dev)
        steps += 1
    return slices / (time.perf_counter() - start)


def measure_training_throughput(cfg: Config, device: str | torch.device = "cpu", max_seconds: float = MAX_SECONDS) -> float:
    """Training slices per second of ``cfg`` on ``device``: ``WARMUP_STEPS`` untimed steps, then
    timed steps until ``MAX_STEPS`` or ``max_seconds`` (at least ``MIN_STEPS``).

    A batch is ``image`` (B, C, H, W) standard normal and ``label`` (B, 1, H, W) with a
    lesion in its centre quarter (B = ``train.batch_size``, C = ``model.in_channels``,
    (H, W) = ``train.patch_size``). Torch's thread count is set to ``train.threads`` for the
    measurement and restored after. Raises ``ConfigError`` for a detection model (its step
    takes instance targets; plan it with the assumed throughput) or a device
    :func:`medseg.runtime.resolve_device` refuses (e.g. CUDA where torch sees no GPU).
    """
    from medseg.engine.optim import build_optimizer, optimiser_step
    from medseg.losses import build_loss
    from medseg.models import build_model
    from medseg.runtime import autocast, autocast_dtype

    dev = _measurable_device(cfg, device)
    t = cfg.train
    with _torch_threads(t.threads):
        generator = torch.Generator().manual_seed(0)
        model: nn.Module = build_model(cfg.model).to(dev).train()
        memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
        model.to(memory_format=memory_format)
        optimizer = build_optimizer(model, t.optimizer)
        loss_fn = build_loss(cfg.model.out_channels, t.loss)
        amp = autocast_dtype(t.amp, dev)
        scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
        b, (h, w) = t.batch_size, t.patch_size
        image = torch.randn(b, cfg.model.in_channels, h, w, generator=generator).to(dev)
        image = image.contiguous(memory_format=memory_format)
        label = torch.zeros(b, 1, h, w)
        label[..., h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1.0
        label = label.to(dev)

        def step() -> int:
            with autocast(dev, amp):
                logits = model(image)
            optimiser_step(loss_fn(logits, label), model, optimizer, scaler, t.grad_clip)
            return b

        for _ in range(WARMUP_STEPS):
            step()
        return _slices_per_second(step, dev, MIN_STEPS, MAX_STEPS, max_seconds)


@contextmanager
def training_batches(cfg: Config, cases: TrainingCases, device: torch.device,
                     n_batches: int) -> Iterator[tuple[Trainer, Iterator[dict[str, torch.Tensor]]]]:
    """A ``Trainer`` of ``cfg`` set up on ``cases.train`` (loaded in memory; ``cases.val`` is
    not read) in a temporary folder, in training mode, and an iterator over its DataLoader's
    batches (its workers, augmentation) with at least ``n_batches`` in the epoch. ``cfg`` is not
    changed. The loader's persistent workers end when the caller lets go of the iterator (the
    folder holds nothing they use). Used here and by ``benchmarks/bench_training.py``."""
    import tempfile

    from medseg.engine.distributed import DistInfo
    from medseg.engine.trainer import Trainer

    cfg = cfg.model_copy(deep=True)
    # one epoch holds every batch, so one loader iterator (and its workers) serves the caller
    cfg.train.samples_per_epoch = max(cfg.train.samples_per_epoch, n_batches * cfg.train.batch_size)
    with tempfile.TemporaryDirectory(prefix="medseg-throughput-") as tmp:
        trainer = Trainer(cfg, tmp, progress=False)
        trainer.setup(TrainingCases(cases.manifest, cases.train, [], cases.channels, cases.modality),
                      DistInfo(rank=0, world_size=1, local_rank=0, device=device))
        trainer.model.train()
        trainer.sampler.set_epoch(1)
        yield trainer, iter(trainer.loader)


def measure_pipeline_throughput(
    cfg: Config, cases: TrainingCases, device: str | torch.device = "cpu", max_seconds: float = MAX_SECONDS
) -> float:
    """Training slices per second of ``cfg`` through its data pipeline: a ``Trainer`` on
    ``cases.train`` (loaded in memory, ``cases.val`` ignored; a few cases suffice) draws
    batches from its DataLoader (``train.num_workers`` workers, augmentation) into optimiser
    steps (:func:`training_batches`). Untimed: ``WARMUP_STEPS`` plus the prefetched batches
    (workers x ``train.prefetch_factor``); timed: steps until ``PIPELINE_MAX_STEPS`` or
    ``max_seconds`` (at least ``PIPELINE_MIN_STEPS``). Torch's thread count is
    ``train.threads`` for the measurement (``None``: left as it is, PyTorch's default unless
    the caller changed it) and restored after; the trainer's log stays quiet. Raises
    ``ConfigError`` for a detection model or a refused device, and what loading the cases
    raises (e.g. ``InputFileError``).
    """
    import logging

    dev = _measurable_device(cfg, device)
    t = cfg.train
    untimed = WARMUP_STEPS + t.num_workers * t.prefetch_factor
    trainer_log = logging.getLogger("medseg.engine.trainer")
    level = trainer_log.level
    trainer_log.setLevel(logging.WARNING)  # its "train: N case(s) ..." line would read as a training run
    try:
        with _torch_threads(t.threads), training_batches(cfg, cases, dev, untimed + PIPELINE_MAX_STEPS) as (trainer, batches):

            def step() -> int:
                batch = next(batches)
                trainer.step(trainer.model, batch, dev)
                return batch["image"].shape[0]

            for _ in range(untimed):
                step()
            return _slices_per_second(step, dev, PIPELINE_MIN_STEPS, PIPELINE_MAX_STEPS, max_seconds)
    finally:
        trainer_log.setLevel(level)


__all__ = ["measure_pipeline_throughput", "measure_training_throughput", "training_batches"]
