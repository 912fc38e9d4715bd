"""``medseg accelerate``: compile a model folder's fold models for a runtime backend and check
them against the fp32 torch ensemble on the cross-validation patients.

1. Every fold checkpoint of the model folder (:func:`medseg.auto.model_folder.read_model_folder`)
   is exported into ``MODEL_DIR/<BACKENDS_DIR>/<backend>-<precision>/``
   (:func:`medseg.inference.compilation.compile_model`). int8 is calibrated per fold model on that
   fold's *training* patients of the pool manifest (its held-out patients never calibrate it; a
   checkpoint whose name gives no fold, ``[<candidate>_]fold_<k>[_r<r>].pt``, is calibrated on every pool
   patient of ``folds.json``).
2. Every patient of the model folder's ``folds.json`` that the manifest holds goes through
   medseg's inference path (:class:`medseg.inference.case.CasePredictor`: preprocessing, the
   sliding-window ensemble, inversion to the source grid, the folder's post-processing) twice:
   with the fp32 torch ensemble and with the compiled ensemble; both without cascade, so every
   fold model runs on every slice.
3. Dice of the two post-processed masks per case (foreground; for multi-class models the lowest
   per-class Dice; both empty = 1). The variant is accepted only when every case reaches
   :data:`medseg.inference.backends.ACCEPT_DICE`.
4. ``MODEL_DIR/<BACKENDS_RECORD>`` gets (or replaces) the variant's entry: accepted, min Dice and
   its case, per-case Dice, the threshold, timings, the CPU, library versions, the checkpoints'
   and compiled files' sha256. ``medseg infer`` loads the variant only while that entry accepts
   it for the same files (:func:`medseg.inference.backends.accepted_entry`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medseg.atomic import sha256_file, write_json
from medseg.errors import MedsegError
from medseg.inference import backends, compilation
from medseg.outputs import BACKENDS_DIR, BACKENDS_RECORD

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class AccelerationResult:
    """One variant's check: the record entry written and where."""

    name: str
    entry: dict[str, Any]
    record: Path

    @property
    def accepted(self) -> bool:
        return bool(self.entry["accepted"])


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two label masks (same shape): foreground (> 0) for binary masks, else the lowest
    Dice over the classes present in either; 1.0 when both are empty (they agree)."""
    classes = sorted(set(np.unique(a).tolist()) | set(np.unique(b).tolist()) - {0})
    if len(classes) <= 1:
        classes_masks = [(a > 0, b > 0)]
    else:
        classes_masks = [(a == c, b == c) for c in classes]
    worst = 1.0
    for x, y in classes_masks:
        total = int(x.sum()) + int(y.sum())
        if total:
            worst = min(worst, 2.0 * int(np.logical_and(x, y).sum()) / total)
    return worst


def check_writable(model_dir: Path) -> None:
    """Refuse a model folder (or its backends folder) this process cannot write into."""
    for folder in (model_dir, model_dir / BACKENDS_DIR):
        if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
            raise MedsegError(f"{folder}: the model folder is read-only; medseg accelerate writes the compiled models "
                              "and their check into it: copy the folder somewhere writable (cp -r) and accelerate the "
                              "copy")  # fmt: skip


def accelerate(
    model_dir: str | Path,
    manifest: str | Path,
    backend: str,
    precision: str = "auto",
    threads: int | None = None,
    calibration_per_case: int = 8,
    progress: Callable[[str], None] | None = None,
) -> AccelerationResult:
    """Compile, check and record one ``backend``/``precision`` of the model folder ``model_dir``
    against the pool ``manifest`` (module docstring). Returns the record entry; raises
    ``MedsegError`` (naming the file) for a read-only or broken folder, a manifest holding none of
    its cross-validation patients, a missing backend package or an unsupported precision."""
    from medseg.auto.folds import FOLDS_FILE, read_folds
    from medseg.auto.model_folder import read_model_folder
    from medseg.inference.bundle import load_bundle
    from medseg.inference.cases import cases_from_manifest
    from medseg.manifest import read_manifest

    say = progress or log.info
    folder_path = Path(model_dir)
    folder = read_model_folder(folder_path)
    name_precision = backends.resolve_precision(backend, precision)
    backends.require_backend(backend)
    check_writable(folder_path)
    folds_path = folder_path / str(folder.record.get("folds") or FOLDS_FILE)
    folds = read_folds(folds_path)
    rows = read_manifest(manifest)
    pool = set(folds.case_ids)
    cv_rows = [r for r in rows if r.case_id in pool]
    if not cv_rows:
        raise MedsegError(f"{manifest}: holds none of the {len(pool)} cross-validation cases of "
                          f"{folds_path}; give the pool manifest the model was "
                          "trained on")  # fmt: skip

    # the fp32 torch ensemble, as medseg infer --model runs it (the folder's rule), without cascade
    settings = {**folder.postprocess, "backend": "torch", "precision": "fp32", "cascade": False,
                "write_lesions": False, "write_prob": False, "output_format": "nifti", "threads": threads}  # fmt: skip
    reference = load_bundle(folder.checkpoints, device="cpu", settings=settings, model_dir=folder_path)
    name = backends.variant_name(backend, name_precision)
    out = backends.variant_dir(folder_path, backend, name_precision)

    # 1. compile (int8: each fold model calibrated on its training patients)
    start = time.perf_counter()
    stacks_by_case: dict[str, list[np.ndarray]] = {}
    if name_precision == "int8":
        train_rows = [r for r in rows if r.case_id in pool and r.label is not None]
        say(f"{name}: calibration stacks from {len(train_rows)} pool case(s)")
        stacks_by_case = compilation.calibration_stacks(train_rows, reference.config, _stride(reference.models),
                                                     per_case=calibration_per_case)  # fmt: skip
    files: list[dict[str, str]] = []
    calibration: dict[str, list[str]] = {}
    in_channels = reference.config.model.in_channels
    for ckpt, model in zip(folder.checkpoints, reference.models, strict=True):
        stacks: list[np.ndarray] = []
        if name_precision == "int8":
            cases = _calibration_cases(ckpt, folds, rows, stacks_by_case)
            calibration[ckpt.name] = cases
            stacks = [s for c in cases for s in stacks_by_case[c]]
        say(f"{name}: compiling {ckpt.name}")
        written = compilation.compile_model(model, in_channels, out, ckpt.stem, backend, name_precision, stacks)
        files += [{"checkpoint": ckpt.name, "file": p.relative_to(folder_path).as_posix(), "sha256": sha256_file(p)}
                  for p in written]  # fmt: skip
    compile_seconds = time.perf_counter() - start
    compiled = [backends.load_backend_model(backends.compiled_file(out, ckpt.stem, backend, name_precision), backend,
                                            name_precision, int(getattr(model, "multiple", 1)), threads)
                for ckpt, model in zip(folder.checkpoints, reference.models, strict=True)]  # fmt: skip
    inference = reference.inference.model_copy(update={"backend": backend, "precision": name_precision,
                                                       "channels_last": False})  # as load_bundle runs it
    candidate = dataclasses.replace(reference, models=compiled,
                                    config=reference.config.model_copy(update={"inference": inference}))  # fmt: skip

    # 2.-3. both ensembles through the inference path on every cross-validation case
    per_case, seconds = _compare(reference, candidate, cases_from_manifest(manifest, reference.channels,
                                                                           reference.modality), pool, say)  # fmt: skip
    worst_case = min(per_case, key=per_case.__getitem__)
    entry = {
        "backend": backend,
        "precision": name_precision,
        "accepted": all(d >= backends.ACCEPT_DICE for d in per_case.values()),
        "threshold": backends.ACCEPT_DICE,
        "min_dice": round(per_case[worst_case], 6),
        "worst_case": worst_case,
        "per_case_dice": {k: round(v, 6) for k, v in sorted(per_case.items())},
        "n_cases": len(per_case),
        "checkpoints": [{"file": p.name, "sha256": sha256_file(p)} for p in folder.checkpoints],
        "files": files,
        "calibration_cases": calibration or None,
        "calibration_stacks_per_case": calibration_per_case if calibration else None,
        "timings_s": {"compile": round(compile_seconds, 3), **{k: round(v, 3) for k, v in seconds.items()}},
        "threads": backends.inference_threads(threads),
        "cpu": backends.cpu_name(),
        "versions": backends.library_versions(backend),
        "postprocess": folder.postprocess,
        "manifest": str(manifest),
        "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    record = backends.read_backends_record(folder_path)
    record["entries"][name] = entry
    path = write_json(folder_path / BACKENDS_RECORD, record)
    return AccelerationResult(name, entry, path)


def _stride(models: Sequence[Any]) -> int:
    from medseg.inference.predictor import network_stride

    return network_stride(models)


def _calibration_cases(checkpoint: Path, folds: Any, rows: Sequence[Any], stacks_by_case: dict[str, Any]) -> list[str]:
    """Case ids calibrating ``checkpoint``: its fold's training patients (all pool cases when the
    name gives no fold; :func:`medseg.auto.model_folder.fold_of_checkpoint`)."""
    from medseg.auto.model_folder import fold_of_checkpoint

    fold = fold_of_checkpoint(checkpoint)
    held: set[str] = set()
    if fold is not None and fold < folds.n_folds:
        held = set(folds.patients[fold])
    else:
        log.warning("%s: no fold in the checkpoint's name; calibrating on every pool case", checkpoint.name)
    cases = [r.case_id for r in rows if r.case_id in stacks_by_case and r.patient_id not in held]
    if not cases:
        raise MedsegError(f"{checkpoint.name}: no labelled training case of its fold in the manifest to calibrate int8 on")
    return cases


def _compare(
    reference: Any, candidate: Any, cases: Sequence[Any], pool: set[str], say: Callable[[str], None],
) -> tuple[dict[str, float], dict[str, float]]:
    """Dice per case of the two bundles' post-processed masks, and the seconds each spent in the
    network (summed over the cases) and in the whole comparison."""
    from medseg.inference.case import CasePredictor

    torch_predictor, backend_predictor = CasePredictor(reference), CasePredictor(candidate)
    # one read per case: the candidate shares the reference's preprocessing, so its predictor inverts
    # with the chain that preprocessed (MONAI inverts what that chain recorded on the image)
    backend_predictor.chain = torch_predictor.chain
    per_case: dict[str, float] = {}
    seconds = {"torch_fp32_predict": 0.0, "backend_predict": 0.0, "read_preprocess": 0.0}
    for case in cases:
        if case.case_id not in pool:
            continue
        prepared = torch_predictor.prepare(case)
        seconds["read_preprocess"] += prepared.seconds
        prob, t_torch = torch_predictor.probabilities(prepared)
        mask_torch = torch_predictor.finish(prepared, prob).mask
        prob, t_backend = backend_predictor.probabilities(prepared)
        mask_backend = backend_predictor.finish(prepared, prob).mask
        del prepared, prob
        seconds["torch_fp32_predict"] += t_torch
        seconds["backend_predict"] += t_backend
        per_case[case.case_id] = mask_dice(mask_torch, mask_backend)
        say(f"{case.case_id}: Dice {per_case[case.case_id]:.4f} (torch {t_torch:.1f} s, backend {t_backend:.1f} s)")
    if not per_case:
        raise MedsegError("no cross-validation case could be compared")
    return per_case, seconds
