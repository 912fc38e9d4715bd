"""Inference, from one volume to a batch of cases.

Per volume (shared with training's validation, which imports only these three):
:mod:`.predictor` (``predict_volume``: sliding windows over 2.5D slice stacks, fold ensembles,
flips -> the foreground probability), :mod:`.postprocess` (``postprocess``: probability -> mask)
and :mod:`.instances` (an instance model's per-slice detections linked into 3-D lesions).

Per batch (``medseg infer``; the engine never imports these): :mod:`.bundle` (a model folder or
checkpoints + config), :mod:`.preflight`, :mod:`.case` (``CasePredictor``), :mod:`.cases`,
:mod:`.case_files` (a case's files written and verified, its completion marker),
:mod:`.lesion_table` and :mod:`.batch` (``BatchRun``, resumable; :mod:`.runner` re-exports).
"""

from __future__ import annotations

from medseg.inference.postprocess import postprocess
from medseg.inference.predictor import predict_volume, prepare_models

__all__ = ["postprocess", "predict_volume", "prepare_models"]
