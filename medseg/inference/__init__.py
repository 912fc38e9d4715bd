"""Batch inference: a model bundle (checkpoints + config), input cases, per-case outputs on the
source grid (:mod:`medseg.outputs`), lesion tables, resumable batch runs (``medseg infer``).

``predict_volume`` and ``postprocess`` (re-exported from :mod:`medseg.prediction`, the code path
training's validation shares) are the stable entry points; ``medseg infer`` runs
:mod:`medseg.inference.runner`.
"""

from __future__ import annotations

from medseg.prediction import postprocess, predict_volume, prepare_models

__all__ = ["postprocess", "predict_volume", "prepare_models"]
