"""Inference stage: whole-volume 2.5D prediction, post-processing, lesion tables, batch runs.

``predict_volume`` and ``postprocess`` are the stable entry points (the trainer's validation
uses them); ``medseg infer`` runs :mod:`medseg.inference.runner`.
"""

from __future__ import annotations

from medseg.inference.postprocess import postprocess
from medseg.inference.predictor import predict_volume, prepare_models

__all__ = ["postprocess", "predict_volume", "prepare_models"]
