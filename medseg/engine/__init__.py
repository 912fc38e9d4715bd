"""Training engine: the trainer, torchrun helpers, checkpoints with resume state."""

from __future__ import annotations

from medseg.engine.trainer import Trainer, TrainResult, train

__all__ = ["TrainResult", "Trainer", "train"]
