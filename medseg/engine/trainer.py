"""The training loop: data, model, optimiser, AMP, validation, checkpoints, resume, stopping.

``Trainer(cfg, out_dir).fit()`` trains ``cfg.model`` on the manifest's ``train`` cases and
validates on its ``val`` cases (whole volumes, see ``medseg.engine.validation``). Run plainly it
is one process; under ``torchrun`` every rank runs the same code: PyTorch DDP averages the
gradients, the lesion-aware sampler gives each rank its own batches of one global plan,
losses and validation sums are reduced over ranks, and only rank 0 writes files.

Outputs in ``out_dir``: ``config.yaml`` (the resolved config), ``last.pt`` (every epoch),
``best.pt`` (best validation Dice; without validation cases: every epoch; with
``train.ema_decay`` both hold the weight average, see ``medseg.engine.ema``),
``epoch_NNN.pt`` (with ``train.save_every``), ``history.csv`` and ``tensorboard/``.

Instance models (``maskrcnn``): the cached volumes hold per-slice lesion instance ids
(``data.labels.instances``), the model's forward with the instances returns its loss terms
(summed; no Dice/CE), and unset ``model.anchor_sizes`` are sized from the training lesions and
written into the run's config.

Cross-validation (``fold=k``, :mod:`medseg.auto.folds`): the held-out fold is validated every
epoch for the record, but nothing is chosen on it: no ``best.pt``, no early stopping; the
fold's model is ``last.pt`` (the weights after the last epoch).
Prepared data (``prepared``, :class:`medseg.engine.setup.PreparedData`; distillation): the
caller's cases and volumes replace the manifest's, e.g. volumes whose targets are a teacher's
probabilities (``TrainVolume.soft_label``; the Dice + BCE loss takes them as they are).
Time budget (``train.max_minutes``): after the first epoch the trainer measures how many epochs
fit; when fewer than ``train.epochs`` do, the learning-rate schedule is shortened to end there
(a machine slower than the plan assumed trains fewer epochs, each schedule complete).
``resume=True`` continues from ``out_dir/last.pt`` exactly: weights, optimiser, scheduler,
gradient scaler, epoch, sampler and every rank's generator states, so on the CPU a resumed run
reproduces the uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from medseg.config import Config, dump_config
from medseg.data import LesionAwareSampler, SliceDataset, SliceIndex, load_volumes, train_transforms
from medseg.engine.checkpointing import (
    TrainState,
    capture_rng,
    read_resume_state,
    restore_rng,
    seed_everything,
)
from medseg.engine.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    gather_objects,
    init_distributed,
    reduce_sums,
    shutdown_distributed,
)
from medseg.engine.ema import build_ema
from medseg.engine.history import MetricsHistory
from medseg.engine.optim import (
    build_optimizer,
    build_scheduler,
    epochs_within_budget,
    fit_scheduler,
    optimiser_step,
)
from medseg.engine.setup import PreparedData, TrainingCases, check_training_setup
from medseg.engine.validation import ValidationResult, shard, validate
from medseg.errors import ConfigError, MedsegError
from medseg.losses import build_loss
from medseg.model_names import is_instance_arch
from medseg.outputs import BEST_CHECKPOINT, LAST_CHECKPOINT, RUN_CONFIG
from medseg.progress import progress_enabled
from medseg.runtime import autocast, autocast_dtype, resolve_train_device, set_threads

log = logging.getLogger(__name__)
RESUME_CHECKED_SECTIONS = ("data", "preprocess", "model")
MIN_HEAD_CHANNELS = 16


@dataclass(frozen=True)
class TrainResult:
    """How a run ended: epochs completed, best validation Dice and its epoch, and why it stopped
    (``epochs``, ``early_stopping`` or ``time_budget``)."""

    out_dir: Path
    epochs_done: int
    best_metric: float
    best_epoch: int
    stop_reason: str


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of ``train.amp`` on ``device`` (``None`` = fp32).

    ``auto``: bf16 on CUDA GPUs that support it (else fp16) and on CPUs with AVX-512 BF16 / AMX
    (3-4x faster training steps than fp32 on the 2-core Xeon of docs/benchmarks.md); fp32 on
    other CPUs.
    """
    return autocast_dtype(setting, device)


def bare(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def thin_head_warning(model: nn.Module) -> str | None:
    """A warning when the 1x1 output ``head`` reads fewer than ``MIN_HEAD_CHANNELS`` features, else None.

    The head reads ReLU outputs (>= 0), so when all its weights are negative every logit is at
    most the head's bias: a binary model then predicts no lesion anywhere (Dice 0) whatever it
    sees. With C channels a fresh head draws that with probability 2**-C (1 in 16 at C = 4, what
    the default decoder gives a ResNet at width 0.25), and the early push of the background
    voxels towards negative logits makes it likelier still.
    """
    head = getattr(bare(model), "head", None)
    if not isinstance(head, nn.Conv2d) or head.in_channels >= MIN_HEAD_CHANNELS:
        return None
    return (
        f"the output head reads only {head.in_channels} decoder channel(s) (ReLU outputs); if all its "
        "weights turn negative, every logit is capped at its bias and the model predicts no lesion at all. "
        f"Give the last decoder block at least {MIN_HEAD_CHANNELS} channels (model.decoder_channels, e.g. "
        "ending in 16) or raise model.width"
    )


class Trainer:
    """One training run (see the module docstring). ``progress``: tqdm bars on rank 0.

    ``fold``/``folds_dir``: train cross-validation fold ``fold`` with the assignment in
    ``folds_dir/folds.json`` (:func:`medseg.engine.setup.check_training_setup`).
    ``single_process``: one process even under torchrun (no DDP; ``cuda:LOCAL_RANK``).
    ``prepared``: train on these cases and volumes instead of the manifest's (module docstring).
    """

    def __init__(
        self,
        cfg: Config,
        out_dir: str | Path,
        resume: bool = False,
        progress: bool = True,
        fold: int | None = None,
        folds_dir: str | Path | None = None,
        single_process: bool = False,
        prepared: PreparedData | None = None,
    ) -> None:
        self.cfg = cfg
        self.prepared = prepared
        self.single_process = single_process
        self.out_dir = Path(out_dir)
        self.fold = fold
        self.folds_dir = Path(folds_dir) if folds_dir is not None else self.out_dir
        self.resume = resume
        self.progress = progress
        self.start_time = time.monotonic()
        self.detector = is_instance_arch(cfg.model.arch)  # Mask R-CNN: instance targets, its own loss

    # ----------------------------------------------------------------- set-up
    def _load_data(self, cases: TrainingCases, info: DistInfo) -> None:
        cfg = self.cfg
        cache = cfg.train.cache_dir
        show = self.progress and info.is_main
        inst = self.detector
        if self.prepared is not None:
            self._use_prepared(self.prepared, info)
            return
        if cache is not None and info.distributed:  # rank 0 fills the cache, the others read it
            if info.is_main:
                load_volumes(cases.train + cases.val, cfg.preprocess, cfg.data.labels, cache, show, inst)
            barrier(info)
        self.train_volumes = load_volumes(cases.train, cfg.preprocess, cfg.data.labels, cache, show, inst)
        if not any(bool(v.label.any()) for v in self.train_volumes):  # every mask empty: a foreground value never seen?
            from medseg.labels import require_foreground

            require_foreground([c.label for c in cases.train if c.label is not None], 0, cfg.data.labels, "training")
        self.val_volumes = load_volumes(shard(cases.val, info), cfg.preprocess, cfg.data.labels, cache, show, inst)
        if self.detector and cfg.model.anchor_sizes is None:
            self._size_anchors(info)
        self._index_and_loader(cases, info)

    def _use_prepared(self, prepared: PreparedData, info: DistInfo) -> None:
        """The caller's volumes (:class:`PreparedData`) in place of the manifest's."""
        if self.detector:
            raise ConfigError("prepared training data (distillation) needs a segmentation model, not an instance model")
        self.train_volumes = list(prepared.train)
        self.val_volumes = shard(list(prepared.val), info)
        self._index_and_loader(prepared.cases, info)

    def _index_and_loader(self, cases: TrainingCases, info: DistInfo) -> None:
        """Slice index, lesion-aware sampler, dataset and loader over ``self.train_volumes``."""
        cfg = self.cfg
        index = SliceIndex.from_volumes(self.train_volumes, connectivity_2d=cfg.stats.connectivity_2d)
        t = cfg.train
        self.steps_per_epoch = max(1, math.ceil(t.samples_per_epoch / (t.batch_size * info.world_size)))
        self.sampler = LesionAwareSampler(
            index.lesion, t.batch_size, self.steps_per_epoch, t.lesion_fraction, t.seed, info.rank, info.world_size
        )
        dataset = SliceDataset(
            self.train_volumes,
            index,
            cfg.preprocess.context_slices,
            train_transforms(t.augment, t.patch_size, t.lesion_crop_prob, len(cases.channels)),
        )
        workers = t.num_workers
        self.loader = DataLoader(
            dataset,
            batch_size=t.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            prefetch_factor=t.prefetch_factor if workers > 0 else None,
            persistent_workers=workers > 0,
            pin_memory=info.device.type == "cuda",
            # the loader's own seed comes from this generator, never from the global one,
            # so the number of workers and a resume do not shift the model's random stream
            generator=torch.Generator().manual_seed(t.seed),
        )
        log.info(
            "train: %d case(s), %d slices (%d with lesion); val: %d case(s) %s; %d step(s)/epoch x %d slices x %d rank(s)",
            len(cases.train), len(index), int(index.lesion.sum()), len(cases.val),
            [c.case_id for c in cases.val], self.steps_per_epoch, t.batch_size, info.world_size,
        )  # fmt: skip

    def _size_anchors(self, info: DistInfo) -> None:
        """Mask R-CNN anchors from the training lesions (:func:`medseg.models.detection.anchors.
        anchor_sizes`), written into this run's config (and so into its checkpoints). Every rank
        loads every training case, so every rank computes the same sizes."""
        from medseg.models.detection.anchors import anchor_sizes
        from medseg.models.detection.maskrcnn import instance_sides

        sides = [side for volume in self.train_volumes for side in instance_sides(volume.label.numpy())]
        sizes = [round(v, 2) for v in anchor_sizes(sides, 4)]
        self.cfg = self.cfg.model_copy(deep=True)  # the caller's config stays as given
        self.cfg.model.anchor_sizes = sizes
        if info.is_main:
            log.info("maskrcnn anchors from %d training lesion slice(s): %s px", len(sides), sizes)

    def _build(self, info: DistInfo) -> None:
        from medseg.models import build_model

        cfg = self.cfg
        self.model: nn.Module = build_model(cfg.model).to(info.device)
        warning = thin_head_warning(self.model)
        if warning is not None and info.is_main:
            log.warning("%s", warning)
        self.channels_last = cfg.train.channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, cfg.train.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.schedule, self.steps_per_epoch, cfg.train.epochs)
        self.amp = amp_dtype(cfg.train.amp, info.device)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.amp == torch.float16)
        self.loss_fn = build_loss(cfg.model.out_channels, cfg.train.loss)
        decay = cfg.train.ema_decay
        self.ema = build_ema(self.model, decay) if decay is not None else None
        self.state = TrainState()

    @property
    def eval_model(self) -> nn.Module:
        """The network that is validated and saved: the weight average with ``train.ema_decay``."""
        return self.ema.module if self.ema is not None else self.model

    def _restore(self, info: DistInfo) -> None:
        path = self.out_dir / LAST_CHECKPOINT
        if not path.is_file():
            raise MedsegError(f"--resume: {path} not found (no run to resume in {self.out_dir})")
        saved = read_resume_state(path)
        current = self.cfg.model_dump(mode="json")
        try:  # through today's schema: settings added since the run started read as their defaults
            saved_sections = type(self.cfg).model_validate(saved["config"]).model_dump(mode="json")
        except Exception:  # noqa: BLE001 -- a config today's schema rejects differs by definition
            saved_sections = saved["config"]
        for section in RESUME_CHECKED_SECTIONS:
            if saved_sections.get(section) != current[section]:
                raise ConfigError(
                    f"--resume: config section '{section}' differs from the one {path} was trained with; "
                    f"resume with the same {', '.join(RESUME_CHECKED_SECTIONS)} sections (see {self.out_dir / RUN_CONFIG})"
                )
        if saved["config"].get("train") != current["train"]:
            log.warning("resuming with a changed train section (allowed, but the run is no longer a pure continuation)")
        # with a weight average, the checkpoint's state_dict is the average and the trained
        # weights ride along in train_weights
        self.model.load_state_dict(saved.get("train_weights", saved["state_dict"]))
        if self.ema is not None:
            if "ema_updates" not in saved:
                raise MedsegError(f"--resume: {path} was trained without train.ema_decay; resume with ema_decay: null")
            self.ema.module.load_state_dict(saved["state_dict"])
            self.ema.n_averaged.fill_(int(saved["ema_updates"]))
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.sampler.load_state_dict(saved["sampler"])
        self.state = TrainState(
            epoch=int(saved["epoch"]),
            global_step=int(saved["global_step"]),
            best_metric=float(saved["best_metric"]),
            best_epoch=int(saved["best_epoch"]),
            bad_validations=int(saved["bad_validations"]),
            schedule_epochs=int(saved.get("schedule_epochs", 0)),
        )
        rng = saved["rng"]
        if len(rng) == info.world_size:
            restore_rng(rng[info.rank], info.device)
        else:
            log.warning(
                "checkpoint was trained on %d rank(s), this run has %d: generator states reseeded (not an exact resume)",
                len(rng), info.world_size,
            )  # fmt: skip
            seed_everything(self.cfg.train.seed + 1000 * self.state.epoch + info.rank)
        log.info("resumed from %s at epoch %d (best Dice %.4f at epoch %d)", path, self.state.epoch,
                 self.state.best_metric, self.state.best_epoch)  # fmt: skip

    # ------------------------------------------------------------------ steps
    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """One optimiser step on ``batch`` (``image`` (B, C*(2k+1), h, w), ``label`` (B, 1, h, w)):
        autocast forward, float32 loss, (scaled) backward, gradient clipping, optimiser and
        scheduler step. Returns the detached loss."""
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, self.amp):
            if self.detector:  # label = per-slice instance ids; the model returns its loss terms
                from medseg.models.detection.maskrcnn import instance_targets

                terms = model(x, instance_targets(y))
            else:
                logits = model(x)
        loss = sum(v.float() for v in terms.values()) if self.detector else self.loss_fn(logits, y)
        optimiser_step(loss, model, self.optimizer, self.scaler, self.cfg.train.grad_clip)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(bare(model))
        self.state.global_step += 1
        return loss.detach()

    def _train_epoch(self, model: nn.Module, epoch: int, info: DistInfo) -> float:
        """One epoch of optimiser steps; returns the loss averaged over steps and ranks."""
        model.train()
        self.sampler.set_epoch(epoch)
        total = torch.zeros((), dtype=torch.float64, device=info.device)
        steps = 0
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {epoch}/{self.cfg.train.epochs}",
            unit="step",
            leave=False,
            disable=not progress_enabled(self.progress and info.is_main),
        )
        for batch in self.loader:
            loss = self.step(model, batch, info.device)
            steps += 1
            total += loss.double()
            if not bar.disable:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                bar.update(1)
        bar.close()
        loss_sum, n = reduce_sums([float(total), float(steps)], info)
        if not math.isfinite(loss_sum):
            raise MedsegError(
                f"training diverged at epoch {epoch} (loss is not finite); lower train.optimizer.lr "
                "or set train.amp: off"
            )
        return loss_sum / max(n, 1.0)

    def _extra(self, cases: TrainingCases, row: dict[str, Any], rng: list[Any]) -> dict[str, Any]:
        return {
            "config": self.cfg.model_dump(mode="json"),
            "channels": list(cases.channels),
            "modality": cases.modality,
            **self.state.as_dict(),
            "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float, str, bool))},
            "world_size": len(rng),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng,
            **(
                {"train_weights": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                 "ema_updates": int(self.ema.n_averaged)}
                if self.ema is not None else {}
            ),
        }  # fmt: skip

    def _save(self, cases: TrainingCases, row: dict[str, Any], improved: bool, info: DistInfo) -> None:
        from medseg.models.checkpoint import save_checkpoint

        rng = gather_objects(capture_rng(info.device), info)  # every rank takes part
        if not info.is_main:
            return
        extra = self._extra(cases, row, rng)
        model, epoch = self.eval_model, self.state.epoch
        save_checkpoint(self.out_dir / LAST_CHECKPOINT, model, self.cfg.model, extra)
        if improved and self.fold is None:  # a fold keeps its last weights (module docstring)
            save_checkpoint(self.out_dir / BEST_CHECKPOINT, model, self.cfg.model, extra)
        every = self.cfg.train.save_every
        if every is not None and epoch % every == 0:
            save_checkpoint(self.out_dir / f"epoch_{epoch:03d}.pt", model, self.cfg.model, extra)

    def _out_of_time(self, epoch_seconds: list[float], info: DistInfo) -> bool:
        budget = self.cfg.train.max_minutes
        if budget is None or not epoch_seconds:
            return False
        elapsed = time.monotonic() - self.start_time
        estimate = sum(epoch_seconds[-3:]) / len(epoch_seconds[-3:])
        return bool(broadcast_object(elapsed + estimate > budget * 60.0, info))

    def _fit_schedule_to_budget(self, epoch_seconds: list[float], info: DistInfo) -> None:
        """After the first epoch of a run with ``train.max_minutes``: when the measured epoch
        time says fewer than ``train.epochs`` fit the budget, shorten the learning-rate schedule
        to the epochs that fit, so it decays to its end instead of being cut off at a high rate
        (a slower machine than the plan assumed). Decided once, saved with the state."""
        t = self.cfg.train
        if t.max_minutes is None or self.state.schedule_epochs or len(epoch_seconds) != 1:
            return
        fitted = epochs_within_budget(self.state.epoch, time.monotonic() - self.start_time, epoch_seconds[0], t.max_minutes)
        fitted = int(broadcast_object(fitted, info))
        if fitted >= t.epochs or fitted <= self.state.epoch:
            return
        self.state.schedule_epochs = fitted
        fit_scheduler(self.scheduler, fitted)
        if info.is_main:
            log.warning("time budget: %d of %d epochs fit train.max_minutes = %g at %.0f s per epoch; the learning-rate "
                        "schedule now ends at epoch %d (plan more minutes or fewer epochs to train as configured)",
                        fitted, t.epochs, t.max_minutes, epoch_seconds[0], fitted)  # fmt: skip

    # ------------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        """Train until ``train.epochs``, early stopping or the time budget; see the module docstring."""
        if self.prepared is not None:
            cases = self.prepared.cases
        else:
            cases = check_training_setup(self.cfg, self.fold, self.folds_dir)
        if self.single_process:  # e.g. one cross-validation fold per torchrun rank: no DDP
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            device = resolve_train_device(self.cfg.train.device, local_rank)
            return self._fit(cases, DistInfo(rank=0, world_size=1, local_rank=local_rank, device=device))
        info = init_distributed(self.cfg.train.device)
        try:
            return self._fit(cases, info)
        finally:
            shutdown_distributed()

    def _fit(self, cases: TrainingCases, info: DistInfo) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        if not info.is_main:
            logging.getLogger("medseg").setLevel(logging.WARNING)
        set_threads(t.threads)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        seed_everything(t.seed)
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not self.resume and (self.out_dir / LAST_CHECKPOINT).exists():
                raise MedsegError(f"{self.out_dir} already holds a run ({LAST_CHECKPOINT}); use --resume or another --out")
        barrier(info)
        self.setup(cases, info)
        model = self.model
        if info.distributed:
            ids = [info.device.index] if info.device.type == "cuda" else None
            # a Mask R-CNN batch without lesion leaves the mask head out of the graph
            model = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=self.detector)
        history = MetricsHistory(self.out_dir, self.state.epoch) if info.is_main else None
        if info.is_main:
            dump_config(self.cfg, self.out_dir / RUN_CONFIG)  # with what setup filled in (maskrcnn anchors)
            log.info("device %s, amp %s, %d rank(s); writing to %s", info.device, self.amp, info.world_size, self.out_dir)
        epoch_seconds: list[float] = []
        stop_reason = "epochs"
        try:
            for epoch in range(self.state.epoch + 1, t.epochs + 1):
                if self.state.schedule_epochs and epoch > self.state.schedule_epochs:
                    stop_reason = "time_budget"  # the schedule was fitted to end here
                    break
                if self._out_of_time(epoch_seconds, info):
                    stop_reason = "time_budget"
                    break
                started = time.monotonic()
                train_loss = self._train_epoch(model, epoch, info)
                train_seconds = time.monotonic() - started
                self.state.epoch = epoch
                row: dict[str, Any] = {
                    "epoch": epoch,
                    "step": self.state.global_step,
                    "lr": self.scheduler.get_last_lr()[0],
                    "train_loss": train_loss,
                    "slices_per_s": self.steps_per_epoch * t.batch_size * info.world_size / train_seconds,
                }
                improved = not cases.val
                if cases.val and (epoch % t.val_every == 0 or epoch == t.epochs):
                    result = validate(self.eval_model, self.val_volumes, cfg.preprocess.context_slices,
                                      cfg.inference, info, t.val_batch_size)  # fmt: skip
                    improved = self._update_best(result, epoch)
                    row.update(val_dice=result.dice, val_hd95_mm=result.hd95_mm,
                               val_hd95_undefined=result.n_hd95_undefined)  # fmt: skip
                epoch_seconds.append(time.monotonic() - started)
                row.update(best_dice=self.state.best_metric, best_epoch=self.state.best_epoch,
                           epoch_s=epoch_seconds[-1], elapsed_min=(time.monotonic() - self.start_time) / 60.0)  # fmt: skip
                self._fit_schedule_to_budget(epoch_seconds, info)
                self._save(cases, row, improved, info)
                if history is not None:
                    history.log(row)
                    log.info("epoch %d: %s", epoch, ", ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k != "epoch"))
                patience = t.patience if self.fold is None else None  # stopping on the held-out fold would select on it
                if cases.val and patience is not None and self.state.bad_validations >= patience:
                    stop_reason = "early_stopping"
                    break
        finally:
            if history is not None:
                history.close()
        if info.is_main:
            log.info("stopped (%s) after epoch %d; best val Dice %s at epoch %d", stop_reason, self.state.epoch,
                     _fmt(self.state.best_metric), self.state.best_epoch)  # fmt: skip
        return TrainResult(self.out_dir, self.state.epoch, self.state.best_metric, self.state.best_epoch, stop_reason)

    def setup(self, cases: TrainingCases, info: DistInfo) -> None:
        """Load the data, build model/optimiser/scheduler/loss and, with ``resume``, restore the
        run (also used by ``benchmarks/bench_training.py``). ``seed`` fixes the initialisation."""
        self._load_data(cases, info)
        seed_everything(self.cfg.train.seed)  # model initialisation does not depend on the data loading
        self._build(info)
        if self.resume:
            self._restore(info)
        else:
            seed_everything(self.cfg.train.seed + info.rank)  # per-rank streams (dropout) after the shared init

    def _update_best(self, result: ValidationResult, epoch: int) -> bool:
        if math.isfinite(result.dice) and result.dice > self.state.best_metric + self.cfg.train.min_delta:
            self.state.best_metric, self.state.best_epoch, self.state.bad_validations = result.dice, epoch, 0
            return True
        self.state.bad_validations += 1
        return False


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def train(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    fold: int | None = None,
    folds_dir: str | Path | None = None,
) -> TrainResult:
    """``Trainer(cfg, out_dir, resume, progress, fold, folds_dir).fit()``."""
    return Trainer(cfg, out_dir, resume, progress, fold, folds_dir).fit()
