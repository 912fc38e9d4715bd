"""Optimiser and learning-rate schedule from ``train.optimizer`` / ``train.schedule``.

The schedule is a ``LambdaLR`` stepped after every optimiser step: linear warm-up from
``lr * warmup_start`` to ``lr`` over the warm-up steps, then poly, cosine or constant decay
until the last step of the run (see ``ScheduleConfig``). The multiplier is a small object
(:class:`ScheduleFactor`) whose length a trainer may shorten once it has measured how many
epochs fit its time budget (:func:`epochs_within_budget`); ``LambdaLR`` saves and restores it
with the scheduler's state, so a resumed run keeps the fitted length.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medseg.config import OptimizerConfig, ScheduleConfig


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; weight decay on conv/linear weights only (not on norms and biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def optimiser_step(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, grad_clip: float | None) -> None:
    """Backward pass of ``loss`` and one step of ``optimizer``: gradients cleared first, the loss
    scaled by ``scaler`` (fp16 training; a pass-through when disabled), the gradients unscaled and
    clipped to total norm ``grad_clip`` (``None``: not clipped). The scheduler is the caller's."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return cfg.warmup_start + (1.0 - cfg.warmup_start) * step / warmup_steps
    if cfg.name == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    if cfg.name == "poly":
        return (1.0 - t) ** cfg.power
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class ScheduleFactor:
    """``step -> lr_factor(step, total_steps, warmup_steps, cfg)``; ``total_steps`` may be
    shortened (:meth:`fit_epochs`). A callable object, so ``LambdaLR.state_dict`` keeps its fields."""

    def __init__(self, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int) -> None:
        self.cfg = cfg.model_dump()
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * epochs
        self.warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), self.total_steps)

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_steps, ScheduleConfig(**self.cfg))

    def fit_epochs(self, epochs: int) -> None:
        """Decay to the end of epoch ``epochs`` instead (the warm-up is kept)."""
        self.total_steps = max(self.steps_per_epoch * epochs, self.warmup_steps + 1)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over ``epochs * steps_per_epoch`` steps with ``cfg``'s warm-up and decay."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, ScheduleFactor(cfg, steps_per_epoch, epochs))


def fit_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, epochs: int) -> None:
    """Make ``scheduler`` (from :func:`build_scheduler`) decay to zero at the end of epoch ``epochs``.
    The learning rate of the next step follows the new length."""
    for factor in scheduler.lr_lambdas:
        factor.fit_epochs(epochs)
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)


def epochs_within_budget(done_epochs: int, elapsed_s: float, epoch_s: float, budget_min: float,
                         margin: float = 1.05) -> int:
    """How many epochs in all fit ``budget_min`` minutes: the ``done_epochs`` so far (after
    ``elapsed_s`` seconds) plus as many more of ``epoch_s`` seconds (times ``margin``, for
    the spread between epochs) as the rest of the budget holds."""
    remaining = budget_min * 60.0 - elapsed_s
    more = math.floor(remaining / (epoch_s * margin)) if epoch_s > 0 else 0
    return done_epochs + max(more, 0)
