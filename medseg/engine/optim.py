"""Optimiser and learning-rate schedule from ``train.optimizer`` / ``train.schedule``.

The schedule is a ``LambdaLR`` stepped after every optimiser step: linear warm-up from
``lr * warmup_start`` to ``lr`` over the warm-up steps, then poly, cosine or constant decay
until the last step of the run (see ``ScheduleConfig``).
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


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over ``epochs * steps_per_epoch`` steps with ``cfg``'s warm-up and decay."""
    total = steps_per_epoch * epochs
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)

    def factor(step: int) -> float:
        return lr_factor(step, total, warmup, cfg)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
