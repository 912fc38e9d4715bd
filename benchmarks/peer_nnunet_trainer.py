"""nnU-Net v2's trainer with its schedule fitted to a wall-clock budget (nnU-Net venv only).

``nnUNetTrainerBudget`` is ``nnUNetTrainer`` unchanged -- network, augmentation, deep supervision,
loss, optimiser and poly schedule -- except for three numbers: ``num_epochs``,
``num_iterations_per_epoch`` and ``num_val_iterations_per_epoch``. Once its data loaders run
(``on_train_start``) it measures a few real training iterations (augmented batches from its own
loaders) and validation iterations and the time to write a checkpoint, restores the network and
optimiser to their state before the measurement, and fits the schedule with
:func:`peer_budget.fit_schedule`; after every epoch :func:`peer_budget.refit` re-divides what is
left of the budget from the measured epoch times (epochs left, iterations per epoch). The clock starts when the worker
constructs the trainer (:meth:`set_budget` ``start``), so set-up, loader start and measurement are
inside the budget. nnU-Net finds trainers only inside its package, so the worker imports this
class directly (``peer_nnunet_worker.py``); it is never looked up by name.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from peer_budget import fit_schedule, refit

#: training iterations timed after one warm-up iteration (at least 1; no more once the measurement
#: has taken MEASURE_SHARE of the budget). They draw batches the loaders prefetched while starting,
#: so when augmentation is the bottleneck the estimate is optimistic: the refit after epoch 0
#: (real epoch time) corrects the schedule exactly (peer_budget's module docstring)
MEASURE_ITERATIONS = 4
MEASURE_SHARE = 0.1
#: seconds per epoch for the log lines and the progress plot (until epochs are measured)
BOOKKEEPING_S = 0.5


class nnUNetTrainerBudget(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming
    """``nnUNetTrainer`` whose poly schedule ends at ``budget_s`` (module docstring)."""

    budget_s: float = 0.0
    start: float = 0.0
    budget_record: dict

    def set_budget(self, budget_s: float, start: float) -> None:
        """Train for ``budget_s`` wall seconds counted from ``start`` (``time.monotonic()``)."""
        self.budget_s, self.start = float(budget_s), float(start)
        self.budget_record = {"budget_s": self.budget_s}
        self._epoch_times: list[tuple[float, float, int]] = []  # (epoch s, training-iterations s, iterations)
        self._end_overhead = 1.0

    def _elapsed(self) -> float:
        return time.monotonic() - self.start

    def on_train_start(self) -> None:
        super().on_train_start()
        if not self.budget_s:
            raise RuntimeError("call set_budget(budget_s, start) before training")
        self._fit_to_budget()

    def _fit_to_budget(self) -> None:
        net_state = copy.deepcopy(self.network.state_dict())
        opt_state = copy.deepcopy(self.optimizer.state_dict())
        setup_s = self._elapsed()
        t0 = time.monotonic()
        self.train_step(next(self.dataloader_train))  # warm-up: first batch, allocations
        warmup_s = time.monotonic() - t0
        times: list[float] = []
        while not times or (len(times) < MEASURE_ITERATIONS and time.monotonic() - t0 < MEASURE_SHARE * self.budget_s):
            t1 = time.monotonic()
            self.train_step(next(self.dataloader_train))
            times.append(time.monotonic() - t1)
        t_train = statistics.median(times)
        self.network.eval()
        with torch.no_grad():
            t1 = time.monotonic()
            self.validation_step(next(self.dataloader_val))
            t_val = time.monotonic() - t1
        self.network.train()
        self.network.load_state_dict(net_state)
        self.optimizer.load_state_dict(opt_state)
        with tempfile.TemporaryDirectory(dir=self.output_folder) as tmp:
            t1 = time.monotonic()
            self.save_checkpoint(os.path.join(tmp, "timing.pth"))
            save_s = time.monotonic() - t1
        self._end_overhead = save_s + 1.0
        schedule = fit_schedule(t_train, self.budget_s, elapsed_s=self._elapsed(), sec_per_val_iteration=t_val,
                                epoch_overhead_s=save_s + BOOKKEEPING_S, end_overhead_s=self._end_overhead)  # fmt: skip
        self.num_epochs = schedule.epochs
        self.num_iterations_per_epoch = schedule.iterations_per_epoch
        self.num_val_iterations_per_epoch = schedule.val_iterations_per_epoch
        self.lr_scheduler.max_steps = schedule.epochs
        self.budget_record.update({
            "setup_s": round(setup_s, 2), "warmup_iteration_s": round(warmup_s, 3),
            "measured_iterations": len(times), "sec_per_iteration": round(t_train, 4),
            "sec_per_val_iteration": round(t_val, 4), "checkpoint_s": round(save_s, 3),
            "batch_size": int(self.batch_size), "patch_size": list(self.configuration_manager.patch_size),
            "initial_schedule": schedule.as_dict(), "refits": [],
        })  # fmt: skip
        self.print_to_log_file(f"budget: {schedule.rule}")

    def on_epoch_start(self) -> None:
        self._epoch_t0 = time.monotonic()
        super().on_epoch_start()

    def on_epoch_end(self) -> None:
        super().on_epoch_end()  # increments current_epoch
        self._epoch_times.append((time.monotonic() - self._epoch_t0, self._train_phase_s, self.num_iterations_per_epoch))
        recent = self._epoch_times[-3:]
        t = statistics.mean(train / n for _, train, n in recent)
        rest = statistics.mean(epoch - train for epoch, train, _ in recent)
        epochs, iterations = refit(self.current_epoch, self._elapsed(), self.budget_s, t, rest,
                                   self.num_iterations_per_epoch, self._end_overhead)  # fmt: skip
        if (epochs, iterations) != (self.num_epochs, self.num_iterations_per_epoch):
            self.budget_record["refits"].append({
                "after_epoch": self.current_epoch, "sec_per_iteration": round(t, 3), "epoch_rest_s": round(rest, 2),
                "epochs": epochs, "iterations_per_epoch": iterations,
                "was": [self.num_epochs, self.num_iterations_per_epoch]})  # fmt: skip
            self.print_to_log_file(f"budget: {self.num_epochs} x {self.num_iterations_per_epoch} -> {epochs} x "
                                   f"{iterations} ({t:.2f} s per iteration, {rest:.1f} s per epoch besides)")  # fmt: skip
            self.num_epochs, self.num_iterations_per_epoch = epochs, iterations
            self.lr_scheduler.max_steps = epochs

    def run_training(self) -> None:
        """nnUNetTrainer.run_training with ``num_epochs`` read every epoch (it may be refitted)."""
        self.on_train_start()
        while self.current_epoch < self.num_epochs:
            self.on_epoch_start()
            self.on_train_epoch_start()
            t0 = time.monotonic()
            train_outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self._train_phase_s = time.monotonic() - t0
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]  # fmt: skip
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
        self.on_train_end()
        lrs = self.logger.get_value("lrs", step=None) or []
        self.budget_record.update({
            "epochs": self.num_epochs, "iterations_per_epoch": self.num_iterations_per_epoch,
            "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
            "epoch_s": [round(e[0], 2) for e in self._epoch_times],
            "iterations": sum(e[2] for e in self._epoch_times), "last_lr": float(lrs[-1]) if lrs else None,
            "train_s": round(self._elapsed(), 2), "over_budget_s": round(max(0.0, self._elapsed() - self.budget_s), 2),
        })  # fmt: skip
