"""Validation on whole volumes, exactly as inference predicts and post-processes them.

Each validation volume (slice-major (C, S, H, W), see ``medseg.data.volumes``) goes through
``medseg.inference.predict_volume`` (2.5D stacks, sliding window, precision and TTA from the
``inference`` config section) and ``medseg.inference.postprocess`` (threshold, optional hole
filling / largest component, small-lesion removal), then ``medseg.metrics.voxel`` scores the
mask against the label on the preprocessed grid: Dice and HD95 (mm, using the volume's
spacing). Checkpoint selection therefore sees what ``medseg infer`` would write.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from medseg import runtime
from medseg.config import InferenceConfig
from medseg.data.volumes import TrainVolume
from medseg.engine.distributed import DistInfo, reduce_sums

T = TypeVar("T")


@dataclass(frozen=True)
class ValidationResult:
    """Dataset means over the validation cases of all ranks.

    ``hd95_mm`` averages the cases where it is defined (both masks non-empty);
    ``n_hd95_undefined`` counts the others (an empty prediction of a case with lesion scores
    Dice 0 and no HD95).
    """

    dice: float
    hd95_mm: float
    n_cases: int
    n_hd95_undefined: int


def score_volume(
    model: nn.Module, volume: TrainVolume, context: int, cfg: InferenceConfig, device: torch.device
) -> tuple[float, float]:
    """(Dice, HD95 mm) of one volume's post-processed prediction (HD95 NaN when undefined)."""
    from medseg.inference import postprocess, predict_volume
    from medseg.metrics.voxel import voxel_metrics

    prob = predict_volume([model], volume.image, context, cfg, device, axis=1)  # (S, H, W) or (K, S, H, W)
    mask = postprocess(prob, volume.spacing, cfg)
    metrics = voxel_metrics(mask > 0, volume.label.numpy() > 0, volume.spacing, distances=True)
    return metrics.dice, metrics.hd95_mm


def validate(
    model: nn.Module,
    volumes: Sequence[TrainVolume],
    context: int,
    cfg: InferenceConfig,
    info: DistInfo,
    batch_size: int | None = None,
) -> ValidationResult:
    """Score this rank's ``volumes`` (its shard of the validation cases) and reduce over ranks.

    Every rank must call this (it all-reduces). ``model``: the bare network (not the DDP
    wrapper); its train/eval mode is restored afterwards. ``batch_size``: slices per forward
    pass (``None``: ``cfg.batch_size``).
    """
    dice_sum = hd_sum = 0.0
    n_hd = 0
    if batch_size is not None:
        cfg = cfg.model_copy(update={"batch_size": batch_size})
    for volume in volumes:
        dice, hd95 = score_volume(model, volume, context, cfg, info.device)
        dice_sum += dice
        if math.isfinite(hd95):
            hd_sum += hd95
            n_hd += 1
    total = reduce_sums([dice_sum, float(len(volumes)), hd_sum, float(n_hd)], info)
    n = int(total[1])
    return ValidationResult(
        dice=total[0] / n if n else float("nan"),
        hd95_mm=total[2] / total[3] if total[3] else float("nan"),
        n_cases=n,
        n_hd95_undefined=n - int(total[3]),
    )


def shard(items: Sequence[T], info: DistInfo) -> list[T]:
    """This rank's share of ``items`` (:func:`medseg.runtime.shard`)."""
    return runtime.shard(items, info.rank, info.world_size)
