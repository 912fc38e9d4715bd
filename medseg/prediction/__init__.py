"""Whole-volume 2.5D prediction and its post-processing: the code path shared by training's
validation (:mod:`medseg.engine`) and batch inference (:mod:`medseg.inference`).

``predict_volume`` (:mod:`.predictor`: sliding windows over slice stacks, ensembles, TTA) gives
the foreground probability; ``postprocess`` (:mod:`.postprocess`) turns it into the mask.
"""

from __future__ import annotations

from medseg.prediction.postprocess import postprocess
from medseg.prediction.predictor import predict_volume, prepare_models

__all__ = ["postprocess", "predict_volume", "prepare_models"]
