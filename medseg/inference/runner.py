"""Batch inference, the stable import path: :mod:`.bundle` (checkpoints -> models + config),
:mod:`.case` (one case end to end), :mod:`.batch` (batches with resume, failures and sharding).

Per case: read + preprocess with the checkpoint's own chain (``preprocess_transforms`` of the
config stored in the checkpoint) -> ``predict_volume`` on the preprocessed (C, R, A, S) grid
-> ``Invertd`` of the probabilities onto the source grid (I, J, K) -> ``postprocess`` there ->
lesion instances and table -> atomic writes + completion marker (:mod:`.outputs`).

Batch (``run_inference``, a :class:`BatchRun`): cases whose outputs are complete are skipped; the next case is read
and preprocessed in a background thread while the current one is predicted; a failing case is
recorded (``failures.csv``: case_id, error) and the run carries on. Under ``torchrun`` (env
``RANK``/``WORLD_SIZE``) rank r takes cases r, r + W, r + 2W, ...; each rank records its
failures, and rank 0 merges them into ``failures.csv`` after a barrier (gloo process group).
"""

from __future__ import annotations

from medseg.inference.batch import RUN_RECORD, BatchRun, RunSummary, merge_failures, run_inference
from medseg.inference.bundle import (
    NEUTRAL_SETTINGS,
    InferenceBundle,
    apply_inference_overrides,
    inference_patch,
    load_bundle,
    patch_inference,
)
from medseg.inference.case import CasePredictor, CaseResult, PreparedCase

__all__ = [
    "NEUTRAL_SETTINGS", "RUN_RECORD", "BatchRun", "CasePredictor", "CaseResult", "InferenceBundle", "PreparedCase",
    "RunSummary", "apply_inference_overrides", "inference_patch", "load_bundle", "merge_failures", "patch_inference",
    "run_inference",
]
