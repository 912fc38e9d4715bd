"""Segmentation losses: Dice + cross-entropy (MONAI ``DiceCELoss``).

- one output channel (binary lesion mask): soft Dice on the sigmoid + binary cross-entropy
  on the logits;
- several output channels (classes): soft Dice on the softmax (one-hot target) + softmax
  cross-entropy.

With ``batch_dice`` the Dice sums intersections and volumes over the whole batch before the
ratio (nnU-Net's "batch Dice"): slices without lesion then add false positives to the
denominator instead of producing a degenerate 0/0 Dice of their own.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import nn

from medseg.config import LossConfig


class SegmentationLoss(nn.Module):
    """``loss(logits, target) -> ()``.

    ``logits``: (B, K, H, W) float (any dtype; computed in float32). ``target``: (B, 1, H, W),
    0/1 for K = 1, class indices 0..K-1 for K > 1 (any numeric dtype). For K = 1 the target may
    also be a probability in [0, 1] (distillation's soft targets, :mod:`medseg.auto.distill`):
    MONAI's soft Dice and the BCE with logits take it as it is.
    """

    def __init__(self, out_channels: int, cfg: LossConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or LossConfig()
        self.out_channels = out_channels
        binary = out_channels == 1
        self.loss = DiceCELoss(
            sigmoid=binary,
            softmax=not binary,
            to_onehot_y=not binary,
            batch=cfg.batch_dice,
            lambda_dice=cfg.dice_weight,
            lambda_ce=cfg.ce_weight,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != self.out_channels:
            raise ValueError(f"logits have {logits.shape[1]} channels, the loss expects {self.out_channels}")
        return self.loss(logits.float(), target.float())


def build_loss(out_channels: int, cfg: LossConfig) -> SegmentationLoss:
    """The loss of ``train.loss`` for a model with ``out_channels`` logits channels."""
    return SegmentationLoss(out_channels, cfg)
