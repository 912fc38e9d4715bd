"""k-fold cross-validation: train every fold, predict each held-out patient once, score them.

``run_cross_validation(cfg, manifest, out_dir)`` -- the pipeline stage ``cv`` and
``medseg cv`` -- does, for each fold k of :mod:`medseg.auto.folds`:

1. train on the other folds (:class:`medseg.engine.Trainer` with ``fold=k``; the fold's model
   is its ``last.pt``: nothing is chosen on the held-out patients);
2. predict fold k's patients with that model into ``oof/`` (``medseg infer``'s code path, with
   probabilities: the post-processing search needs them), so every pool patient is predicted
   exactly once by a model that never saw it;

then evaluates ``oof/`` against the references (:func:`medseg.evaluation.runner.evaluate`) and writes
the CV table and summary (computed from rows by :mod:`medseg.auto.cv_summary`). Layout of ``out_dir``::

    folds.json          patient-level fold assignment (fixed for the run)
    fold_<k>/           the fold's training run (last.pt, history.csv, config.yaml, tensorboard/)
                        + fold_key.json (what it was trained from) + fold_done.json (finished)
    fold_<k>_r<r>/      with ``cv.repeats`` > 1: the fold's repeat r (seed train.seed + r);
                        the fold's patients are predicted by the average of its repeats
    oof/                out-of-fold predictions: <case>_mask/_prob/_lesions..., failures.csv
    evaluation/         evaluate()'s tables of oof/ (metrics_per_case.csv, summary.json, ...)
    cv_table.csv        one row per pool case: fold, patient, Dice, HD95, lesion F1, ... + "mean"
    cv_summary.json     means over cases (each with a 95 % patient-bootstrap interval, ``ci95``)
                        and per fold, training seconds per fold, device

Resuming: a fold whose ``fold_done.json`` matches the current training inputs (the data,
preprocess, model, train and fold sections and the fold's patients) is not trained again; a
fold interrupted mid-training resumes from its ``last.pt``; a fold trained from other inputs
is discarded and trained again. Out-of-fold cases already complete (inference markers) are
skipped.

Under ``torchrun`` (``WORLD_SIZE`` > 1) rank r trains (every repeat of) and predicts folds r,
r + W, ... on its own device (``cuda:LOCAL_RANK``), each fold one plain process (no DDP: folds
are independent), and rank 0 evaluates once every rank is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from medseg.atomic import write_csv, write_json
from medseg.auto.cv_summary import cv_table, first_region_rows, summarise
from medseg.auto.folds import FOLDS_FILE, FoldAssignment, cv_pool, load_or_create_folds, read_folds
from medseg.config import Config
from medseg.errors import MedsegError
from medseg.manifest import Case, read_manifest
from medseg.outputs import (
    CV_SUMMARY,
    CV_TABLE,
    EVAL_PER_CASE,
    LAST_CHECKPOINT,
    POSTPROCESS_RULE_KEYS,
    mask_file,
    prob_file,
)

log = logging.getLogger(__name__)

OOF_DIR = "oof"
EVALUATION_DIR = "evaluation"
FOLD_KEY = "fold_key.json"
FOLD_DONE = "fold_done.json"
FOLD_MODEL = LAST_CHECKPOINT  # a fold's model: its weights after the last epoch (nothing chosen on held-out patients)
POSTPROCESS_SETTINGS = (*POSTPROCESS_RULE_KEYS, "connectivity")  # the rule recorded in the CV summary


@dataclass
class CVResult:
    """Where the results are and what failed (case_id, stage, error) along the way."""

    out_dir: Path
    folds: FoldAssignment
    fold_models: list[Path]
    summary: dict[str, Any]
    failures: list[dict[str, str]] = field(default_factory=list)


def fold_dir(out_dir: Path, fold: int, repeat: int = 0) -> Path:
    """``out_dir/fold_<k>`` (repeat 0) or ``out_dir/fold_<k>_r<r>`` (``cv.repeats``)."""
    return out_dir / (f"fold_{fold}" if repeat == 0 else f"fold_{fold}_r{repeat}")


def fold_model_paths(out_dir: Path, folds: Iterable[int], repeats: int) -> list[Path]:
    """The model files of ``folds``, fold by fold and within a fold repeat by repeat (the
    layout only: whether they exist is :func:`fold_models`' check)."""
    return [fold_dir(out_dir, k, r) / FOLD_MODEL for k in folds for r in range(repeats)]


def _unit(fold: int, repeat: int) -> str:
    return f"fold {fold}" if repeat == 0 else f"fold {fold} repeat {repeat}"


def fold_models(out_dir: str | Path, n_folds: int, repeats: int = 1) -> list[Path]:
    """The models of a finished CV run, fold by fold and within a fold repeat by repeat
    (``MedsegError`` if one is missing)."""
    paths = fold_model_paths(Path(out_dir), range(n_folds), repeats)
    missing = [str(p) for p in paths if not (p.parent / FOLD_DONE).is_file() or not p.is_file()]
    if missing:
        raise MedsegError(f"cross-validation in {out_dir} is not finished: no finished fold model {missing}")
    return paths


def training_key(cfg: Config, folds: FoldAssignment, fold: int) -> str:
    """Hash of what a fold's weights depend on: data/preprocess/model/train sections and the
    fold's held-out patients (not ``inference``/``evaluation``: changing those re-predicts,
    it does not retrain)."""
    parts = cfg.model_dump(mode="json", include={"data", "preprocess", "model", "train"})
    parts["fold"] = {"n_folds": folds.n_folds, "seed": folds.seed, "held_out": list(folds.patients[fold])}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def train_fold(cfg: Config, out_dir: Path, folds: FoldAssignment, fold: int, progress: bool = True,
               device: str | None = None, repeat: int = 0) -> Path:  # fmt: skip
    """Train fold ``fold`` (its repeat ``repeat``: seed ``train.seed + repeat``) into
    :func:`fold_dir` unless it is finished with the same inputs (module docstring); returns the
    model's path."""
    from medseg.engine.trainer import Trainer

    folder, unit = fold_dir(out_dir, fold, repeat), _unit(fold, repeat)
    fold_cfg = cfg.model_copy(deep=True)
    fold_cfg.train.seed = cfg.train.seed + repeat
    key = training_key(fold_cfg, folds, fold)
    done = _read_json(folder / FOLD_DONE)
    if done is not None and done.get("key") == key and (folder / FOLD_MODEL).is_file():
        log.info("cv %s: finished earlier (%s), not trained again", unit, folder)
        return folder / FOLD_MODEL
    started = _read_json(folder / FOLD_KEY)
    if folder.exists() and (started is None or started.get("key") != key):
        log.warning("cv %s: %s was trained from other inputs; training it again", unit, folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / FOLD_KEY, {"fold": fold, "repeat": repeat, "key": key})
    if device is not None:
        fold_cfg.train.device = device
    resume = (folder / FOLD_MODEL).is_file()
    start = time.perf_counter()
    result = Trainer(fold_cfg, folder, resume=resume, progress=progress, fold=fold, folds_dir=out_dir,
                     single_process=True).fit()  # fmt: skip
    write_json(folder / FOLD_DONE, {
        "fold": fold, "repeat": repeat, "key": key, "epochs": result.epochs_done, "stop_reason": result.stop_reason,
        "seconds": round(time.perf_counter() - start, 1), "resumed": resume,
    })  # fmt: skip
    return folder / FOLD_MODEL


def predict_fold(cfg: Config, out_dir: Path, folds: FoldAssignment, cases: list[Case], fold: int,
                 device: str | None = None, progress: bool = True, oof_name: str = OOF_DIR) -> list[dict[str, str]]:  # fmt: skip
    """Predict fold ``fold``'s held-out cases into ``out_dir/<oof_name>`` (default ``oof``) with
    its model, or the average of its ``cv.repeats`` models; returns failures."""
    from medseg.inference.cases import InferenceCase
    from medseg.inference.runner import load_bundle, run_inference

    explicit = cfg.inference.model_dump(mode="json", include=cfg.inference.model_fields_set)
    bundle = load_bundle(fold_model_paths(out_dir, [fold], cfg.cv.repeats), device=device,
                         settings={**explicit, "write_prob": True, "write_lesions": True})  # fmt: skip
    _, held_out = folds.split(cases, fold)
    todo = [InferenceCase(c.case_id, {ch: c.images[ch] for ch in bundle.channels}, c.modality) for c in held_out]
    summary = run_inference(todo, bundle, out_dir / oof_name, show_progress=progress, rank_sharding=False,
                            failures_file=f"failures_fold_{fold}.csv")  # fmt: skip
    return [{"case_id": cid, "stage": "cv", "error": f"fold {fold}: {err}"} for cid, err in summary.failures]


def fold_records(out_dir: Path, n_folds: int, repeats: int) -> list[list[dict[str, Any]]]:
    """Per fold, per repeat, its ``fold_done.json`` record (``{}`` where missing or unreadable):
    what :func:`medseg.auto.cv_summary.summarise` reads the training seconds and epochs from."""
    return [[_read_json(fold_dir(out_dir, k, r) / FOLD_DONE) or {} for r in range(repeats)] for k in range(n_folds)]


def evaluate_oof(cfg: Config, out_dir: Path, folds: FoldAssignment, cases: list[Case], device: str,
                 progress: bool = True, pred_dir: Path | None = None, eval_root: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Evaluate the out-of-fold masks (``out_dir/oof``, or ``pred_dir``) against the references;
    write ``evaluation/``, ``cv_table.csv`` and ``cv_summary.json`` into ``eval_root``
    (default ``out_dir``). Returns the summary."""
    from medseg.evaluation.runner import evaluate

    oof = pred_dir or out_dir / OOF_DIR
    root = eval_root or out_dir
    pool = cv_pool(cases)
    predicted = [c for c in pool if mask_file(oof, c.case_id).is_file()]
    if not predicted:
        raise MedsegError(f"{oof}: no out-of-fold prediction to evaluate (see the failures)")
    eval_dir = root / EVALUATION_DIR
    eval_dir.mkdir(parents=True, exist_ok=True)
    eval_cfg = cfg.model_copy(deep=True)
    eval_cfg.evaluation.split = None
    evaluate(oof, cfg.data.manifest or "cross-validation pool", eval_dir, eval_cfg, progress=progress, cases=predicted)
    region, metrics = first_region_rows(pd.read_csv(eval_dir / EVAL_PER_CASE, dtype={"case_id": str}))
    table = cv_table(metrics, folds, cases)
    write_csv(root / CV_TABLE, table)
    summary = summarise(table, folds, fold_records(out_dir, folds.n_folds, cfg.cv.repeats), device)
    summary["region"] = region
    summary["n_pool_cases"] = len(pool)
    summary["inference"] = cfg.inference.model_dump(mode="json", include=set(POSTPROCESS_SETTINGS))
    write_json(root / CV_SUMMARY, summary)
    return summary


def evaluate_postprocessed(cfg: Config, cv_dir: Path, cases: list[Case], out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """The out-of-fold probabilities of ``cv_dir/oof`` post-processed with ``cfg.inference``
    (e.g. the rule chosen on them), evaluated like :func:`evaluate_oof` into ``out_dir``."""
    import tempfile

    from medseg.inference.postprocess import postprocess
    from medseg.io import read_volume, write_mask

    folds = read_folds(cv_dir / FOLDS_FILE)
    out_dir.mkdir(parents=True, exist_ok=True)
    prior = _read_json(cv_dir / CV_SUMMARY) or {}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".masks-") as tmp:
        for case in cv_pool(cases):
            prob_path = prob_file(cv_dir / OOF_DIR, case.case_id)
            if not prob_path.is_file():
                continue
            prob = read_volume(prob_path)
            mask = postprocess(prob.array, prob.spacing, cfg.inference)
            write_mask(mask, prob, mask_file(tmp, case.case_id))
        return evaluate_oof(cfg, cv_dir, folds, cases, prior.get("device", "cpu"), progress, Path(tmp), out_dir)


def run_cross_validation(cfg: Config, manifest: str | Path, out_dir: str | Path, progress: bool = True) -> CVResult:
    """Train every fold, predict each held-out patient, evaluate (module docstring).

    ``cfg.data.manifest`` is replaced by ``manifest``. Returns the result on rank 0 (under
    torchrun the other ranks return after their folds, with an empty summary).
    """
    from medseg.runtime import barrier, join_process_group, leave_process_group, torchrun_rank

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(deep=True)
    cfg.data.manifest = str(manifest)
    cases = read_manifest(manifest)
    rank, world = torchrun_rank()
    created = join_process_group(world)
    if rank == 0:
        folds = load_or_create_folds(out, cases, cfg.cv.folds, cfg.cv.seed, manifest)
    barrier(world)
    folds = load_or_create_folds(out, cases, cfg.cv.folds, cfg.cv.seed, manifest)
    device = _fold_device(cfg.train.device, world)
    failures: list[dict[str, str]] = []
    for k in range(rank, folds.n_folds, world):
        log.info("cv: fold %d of %d (rank %d)", k, folds.n_folds, rank)
        for repeat in range(cfg.cv.repeats):
            train_fold(cfg, out, folds, k, progress, device, repeat)
        failures += predict_fold(cfg, out, folds, cases, k, device, progress)
    barrier(world)
    summary: dict[str, Any] = {}
    if rank == 0:
        failures = _all_fold_failures(out, folds.n_folds)
        summary = evaluate_oof(cfg, out, folds, cases, device or _device_name(cfg.train.device), progress)
    barrier(world)
    leave_process_group(created)
    return CVResult(out, folds, fold_model_paths(out, range(folds.n_folds), cfg.cv.repeats), summary, failures)


def _all_fold_failures(out: Path, n_folds: int) -> list[dict[str, str]]:
    rows = []
    for k in range(n_folds):
        path = out / OOF_DIR / f"failures_fold_{k}.csv"
        if path.is_file():
            for rec in pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records"):
                rows.append({"case_id": rec["case_id"], "stage": "cv", "error": f"fold {k}: {rec['error']}"})
    return rows


def _device_name(preference: str) -> str:
    from medseg.runtime import resolve_train_device

    return str(resolve_train_device(preference))


def _fold_device(preference: str, world: int) -> str | None:
    """Under torchrun each rank's folds go to its own GPU (``cuda:LOCAL_RANK``); else the config's."""
    import os

    if world > 1:
        from medseg.runtime import resolve_train_device

        return str(resolve_train_device(preference, int(os.environ.get("LOCAL_RANK", "0"))))
    return None


__all__ = ["FOLDS_FILE", "CVResult", "evaluate_oof", "evaluate_postprocessed", "fold_models", "predict_fold",
           "run_cross_validation", "train_fold"]
