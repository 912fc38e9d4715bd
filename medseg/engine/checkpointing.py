"""Training checkpoints: what inference needs plus everything for an exact resume.

``best.pt`` and ``last.pt`` are ``medseg.models.checkpoint`` files (atomic, plain tensors and
primitives, read with ``weights_only=True``). Their ``extra`` dict holds:

=================  ===========================================================================
key                content
=================  ===========================================================================
config             the full resolved ``Config`` as a plain dict (``model_dump(mode="json")``)
channels           input channel names, in input order (manifest order)
modality           ``CT`` or ``MR``
epoch              epochs completed
global_step        optimiser steps taken
metrics            this epoch's history row (train loss, learning rate, val Dice/HD95, ...)
best_metric        best validation Dice so far (``-1.0`` before the first validation)
best_epoch         epoch of ``best_metric`` (0 = none)
bad_validations    validations since the last improvement (early stopping)
world_size         number of ranks that trained
optimizer          ``optimizer.state_dict()``
scheduler          ``scheduler.state_dict()``
scaler             ``GradScaler.state_dict()`` (empty when not scaling)
sampler            the sampler's state (seed, epoch)
rng                one entry per rank: torch CPU (and CUDA) generator states, numpy's and
                   Python's global generators as tensors
train_weights      with ``train.ema_decay``: the raw (trained) weights; the checkpoint's
                   ``state_dict`` then holds the weight average that inference uses
ema_updates        with ``train.ema_decay``: updates folded into the average
=================  ===========================================================================
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.errors import MedsegError


@dataclass
class TrainState:
    """Counters that a resume restores (besides weights, optimiser and generators)."""

    epoch: int = 0
    global_step: int = 0
    best_metric: float = -1.0
    best_epoch: int = 0
    bad_validations: int = 0
    schedule_epochs: int = 0  # epochs the schedule was fitted to (time budget); 0 = train.epochs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """This process's generator states as tensors and primitives."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
    )
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def read_resume_state(path: Path) -> dict[str, Any]:
    """The ``extra`` dict of a training checkpoint, checked to hold the resume keys."""
    from medseg.models.checkpoint import load_checkpoint

    payload = load_checkpoint(path)
    extra = payload.get("extra", {})
    missing = [k for k in ("config", "epoch", "optimizer", "scheduler", "sampler", "rng") if k not in extra]
    if missing:
        raise MedsegError(f"{path}: not a resumable training checkpoint (missing {', '.join(missing)})")
    return {"state_dict": payload["state_dict"], **extra}
