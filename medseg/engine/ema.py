"""Exponential moving average (EMA) of the weights and BatchNorm statistics.

With ``train.ema_decay`` set, validation, ``best.pt`` and ``last.pt`` use the averaged network:
after each optimiser step ``ema = d * ema + (1 - d) * weights`` with the decay warmed up as
``d = min(ema_decay, (1 + n) / (10 + n))`` (n = updates so far), so early averages are not
dominated by the random initialisation. Integer buffers (BatchNorm's ``num_batches_tracked``)
are copied. On small data sets the average is steadier from epoch to epoch than the raw
weights, which makes checkpoint selection on a few validation cases less of a lottery.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


def ema_decay_at(decay: float, n_averaged: int) -> float:
    """Decay used for the update after ``n_averaged`` previous updates."""
    return min(decay, (1.0 + n_averaged) / (10.0 + n_averaged))


def _update_fn(decay: float):
    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> None:
        d = ema_decay_at(decay, int(n_averaged))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """``AveragedModel`` of ``model`` (parameters and buffers); call ``update_parameters(model)``
    after every optimiser step and use ``.module`` for evaluation."""
    return AveragedModel(model, multi_avg_fn=_update_fn(decay), use_buffers=True)
