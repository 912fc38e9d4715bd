"""Distillation: one network trained on a model folder's fold ensemble, with an honest check.

``run_distillation(model_dir, manifest)`` -- ``medseg distill`` -- trains, with medseg's
trainer and the targets replaced by teacher probabilities (``TrainVolume.soft_label``: Dice +
BCE on soft targets), the students of :mod:`medseg.auto.distill_plan`:

1. for each fold k a student on fold k's training patients only, taught by fold k's model(s)
   alone (the only ones that never saw fold k's held-out patients), then predicted on the
   held-out patients with the model folder's post-processing rule and scored by medseg's
   evaluation (``medseg.evaluation.runner.evaluate``, Dice of the first region, as CV does);
2. the out-of-fold Dice of the students against the ensemble's (the model folder's
   ``cv_chosen/cv_table.csv``: the same patients under the same rule), paired per patient with
   a patient-bootstrap interval (``medseg.metrics.uncertainty.paired_difference``);
3. the shipped student on every pool patient and the unlabeled cases, taught by the whole
   ensemble, written slim to ``MODEL_DIR/student/last.pt`` with its ``config.yaml``;
4. ``MODEL_DIR/distill.json`` last: per-fold and per-case Dice, the paired difference, the
   margin, ``use_student``, the student's sha256, and which patients each student saw.

Teacher probabilities are ``predict_volume`` of the teacher checkpoints (the model folder's
inference settings: window, mirroring) on the preprocessed volume, the grid training slices:
``TrainVolume.image`` (C, S, H, W) with the slices along dim 1, so the probability is
(S, H, W) on the same voxels as the image slices the student sees.

The fold students and their scoring live in ``work_dir`` (a temporary folder unless given):
``fold_<k>/`` (training run, ``oof/`` predictions, ``evaluation/``) and ``full/``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from medseg.atomic import sha256_file, write_json
from medseg.auto.distill_plan import (
    FULL_STUDENT,
    DistillSettings,
    StudentPlan,
    plan_bookkeeping,
    plan_students,
    split_overrides,
    student_decision,
)
from medseg.auto.folds import FOLDS_FILE, cv_pool, read_folds
from medseg.auto.model_folder import (
    STUDENT_CHECKPOINT,
    STUDENT_FORMAT,
    checkpoints_by_fold,
    fold_sha256,
    read_model_folder,
)
from medseg.config import Config, dump_config, load_config
from medseg.errors import ConfigError, ManifestError, MedsegError
from medseg.manifest import Case, read_manifest
from medseg.metrics.uncertainty import CI_METHOD, paired_difference
from medseg.outputs import (
    CV_CHOSEN_DIR,
    CV_TABLE,
    DISTILL_RECORD,
    EVAL_PER_CASE,
    LAST_CHECKPOINT,
    RUN_CONFIG,
    STUDENT_DIR,
)

if TYPE_CHECKING:
    import torch

    from medseg.data.volumes import TrainVolume
    from medseg.inference.bundle import InferenceBundle

log = logging.getLogger(__name__)

OOF_DIR = "oof"
EVALUATION_DIR = "evaluation"
ENSEMBLE_TABLES = (f"{CV_CHOSEN_DIR}/{CV_TABLE}", CV_TABLE)  # the chosen rule's out-of-fold scores first


@dataclass
class DistillResult:
    """The written record (``record``, at ``record_path``) and the held-out cases that failed."""

    record_path: Path
    record: dict[str, Any]
    failures: list[dict[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------- pieces


def student_config(model_dir: Path, overrides: Sequence[str], settings: DistillSettings, manifest: Path) -> Config:
    """The students' config: the model folder's plan with ``model.*`` / ``train.*`` overrides and
    the time budget; ``ConfigError`` for a network distillation cannot train (not one sigmoid
    output)."""
    cfg: Config = load_config(model_dir / RUN_CONFIG, list(overrides))
    cfg.data.manifest = str(manifest)
    if settings.minutes is not None:
        cfg.train.max_minutes = settings.minutes
    if cfg.model.out_channels != 1:
        raise ConfigError(f"model.out_channels is {cfg.model.out_channels}: distillation trains on the teacher's "
                          "foreground probability, which needs one sigmoid output (model.out_channels: 1)")  # fmt: skip
    return cfg


def check_inputs(cfg: Config, pool: Sequence[Case], unlabeled: Sequence[Case], channels: list[str], modality: str,
                 manifest: Path, unlabeled_manifest: Path | None) -> None:  # fmt: skip
    """Every case has the model folder's channels and modality, the network reads them, and the
    unlabeled cases are not pool cases. Raises ``ManifestError`` / ``ConfigError``."""
    from medseg.engine.setup import expected_in_channels

    for source, cases in ((manifest, pool), (unlabeled_manifest, unlabeled)):
        wrong = [f"{c.where}: channels {c.channels} / modality {c.modality}, the model folder's are {channels} / "
                 f"{modality}" for c in cases if c.channels != channels or c.modality.upper() != modality]  # fmt: skip
        if wrong:
            raise ManifestError(Path(source or "manifest"), wrong)
    shared = sorted({c.case_id for c in pool} & {c.case_id for c in unlabeled})
    if shared:
        raise ManifestError(Path(unlabeled_manifest or "unlabeled"), [f"case(s) {shared} are pool cases too"])
    expected = expected_in_channels(len(channels), cfg.preprocess.context_slices)
    if cfg.model.in_channels != expected:
        raise ConfigError(f"model.in_channels is {cfg.model.in_channels}; the model folder's {len(channels)} channel(s) "
                          f"x {2 * cfg.preprocess.context_slices + 1} slices need {expected}")  # fmt: skip


def preprocessed_images(cases: Sequence[Case], cfg: Config) -> dict[str, TrainVolume]:
    """Each case's preprocessed image (the training chain; the label file is never read):
    case id -> ``TrainVolume`` with an all-0 label."""
    from medseg.data.volumes import preprocess_case

    return {c.case_id: preprocess_case(c, cfg.preprocess, cfg.data.labels, use_label=False) for c in cases}


def teacher_probabilities(teacher: InferenceBundle, volume: TrainVolume) -> torch.Tensor:
    """(S, H, W) float32 foreground probability of ``teacher`` (its models averaged, with its
    inference settings) on ``volume``'s preprocessed (C, S, H, W) image: slices along dim 1."""
    from medseg.inference.predictor import predict_volume

    exact = teacher.inference.model_copy(update={"cascade": False})  # the students learn the ensemble itself
    prob = predict_volume(teacher.models, volume.image, teacher.config.preprocess.context_slices, exact,
                          teacher.device, axis=1)  # fmt: skip
    return prob.contiguous()


def with_soft_targets(volume: TrainVolume, prob: torch.Tensor, floor: float) -> TrainVolume:
    """``volume`` with ``prob`` (S, H, W) as its targets: below ``floor`` set to 0, and the
    label (slice index, lesion-aware sampling) ``prob >= 0.5``."""
    import torch

    from medseg.data.volumes import TrainVolume

    if tuple(prob.shape) != tuple(volume.label.shape):
        raise MedsegError(f"case {volume.case_id}: teacher probability {tuple(prob.shape)} is not on the image's grid "
                          f"{tuple(volume.label.shape)}")  # fmt: skip
    soft = torch.where(prob < floor, torch.zeros((), dtype=torch.float32), prob.float())
    return TrainVolume(volume.case_id, volume.image, (soft >= 0.5).to(torch.uint8), volume.spacing, soft_label=soft)


def train_student(cfg: Config, out_dir: Path, cases: Sequence[Case], volumes: list[TrainVolume],
                  channels: list[str], modality: str, manifest: Path, progress: bool) -> dict[str, Any]:  # fmt: skip
    """Train one student on ``volumes`` (soft targets) into ``out_dir``; its model is
    ``out_dir/last.pt``. Returns epochs, stop reason and seconds."""
    from medseg.engine.setup import PreparedData, TrainingCases
    from medseg.engine.trainer import Trainer

    prepared = PreparedData(TrainingCases(manifest, list(cases), [], channels, modality), volumes, [])
    started = time.perf_counter()
    result = Trainer(cfg, out_dir, progress=progress, single_process=True, prepared=prepared).fit()
    return {"epochs": result.epochs_done, "stop_reason": result.stop_reason,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def score_student(checkpoint: Path, held_out: Sequence[Case], rule: dict[str, Any], eval_cfg: Config, manifest: Path,
                  out_dir: Path, progress: bool) -> tuple[dict[str, float], list[dict[str, str]]]:  # fmt: skip
    """Predict ``held_out`` with the student under the model folder's ``rule`` and score them
    with medseg's evaluation: (case id -> Dice of the first region, failures)."""
    from medseg.evaluation.runner import evaluate
    from medseg.inference.cases import InferenceCase
    from medseg.inference.runner import load_bundle, run_inference

    bundle = load_bundle([checkpoint], settings={**rule, "write_prob": False, "write_lesions": False})
    todo = [InferenceCase(c.case_id, {ch: c.images[ch] for ch in bundle.channels}, c.modality) for c in held_out]
    summary = run_inference(todo, bundle, out_dir / OOF_DIR, show_progress=progress, rank_sharding=False)
    failures = [{"case_id": cid, "error": f"{out_dir.name}: {err}"} for cid, err in summary.failures]
    failed = {f["case_id"] for f in failures}
    predicted = [c for c in held_out if c.case_id not in failed]
    if not predicted:
        return {}, failures
    evaluate(out_dir / OOF_DIR, manifest, out_dir / EVALUATION_DIR, eval_cfg, progress=progress, cases=predicted)
    metrics = pd.read_csv(out_dir / EVALUATION_DIR / EVAL_PER_CASE, dtype={"case_id": str})
    metrics = metrics[metrics["region"] == metrics["region"].iloc[0]]  # the first region is the one the models segment
    return {str(r.case_id): float(r.dice) for r in metrics.itertuples()}, failures


def ensemble_oof_dice(model_dir: Path) -> tuple[pd.DataFrame, str]:
    """The ensemble's out-of-fold Dice per case (``case_id, patient_id, fold, dice``) from the
    model folder's CV table under the chosen rule (``cv_chosen/cv_table.csv``, else
    ``cv_table.csv``), and the file's name. ``MedsegError`` when neither is readable."""
    for name in ENSEMBLE_TABLES:
        path = model_dir / name
        if path.is_file():
            table = pd.read_csv(path, dtype={"case_id": str, "patient_id": str})
            if not {"case_id", "patient_id", "fold", "dice"} <= set(table.columns):
                raise MedsegError(f"{path}: not a cross-validation table (case_id, patient_id, fold, dice expected)")
            return table[table["case_id"] != "mean"][["case_id", "patient_id", "fold", "dice"]].reset_index(drop=True), name
    raise MedsegError(f"{model_dir}: no {' or '.join(ENSEMBLE_TABLES)}: the ensemble's out-of-fold Dice is needed to "
                      "judge the student (a model folder of pipelines/auto.yaml has it)")  # fmt: skip


def compare(per_case: pd.DataFrame, margin: float, n_failed: int) -> dict[str, Any]:
    """The record's comparison of ``per_case`` (``case_id, patient_id, fold, student_dice,
    ensemble_dice``): means, per fold, the paired difference student - ensemble with its
    patient-bootstrap interval, and the decision."""
    both = per_case.dropna(subset=["student_dice", "ensemble_dice"])
    student_mean = float(both["student_dice"].mean()) if len(both) else float("nan")
    ensemble_mean = float(both["ensemble_dice"].mean()) if len(both) else float("nan")
    diff = paired_difference(per_case["student_dice"].to_numpy(float), per_case["ensemble_dice"].to_numpy(float),
                             per_case["patient_id"].astype(str).tolist())  # fmt: skip
    use, reason = student_decision(student_mean, ensemble_mean, margin, n_failed)
    per_fold = [{"fold": int(k), "n_cases": int(len(g)), "student_dice": float(g["student_dice"].mean()),
                 "ensemble_dice": float(g["ensemble_dice"].mean())} for k, g in both.groupby("fold")]  # fmt: skip
    return {
        "students_mean_dice": student_mean,
        "ensemble_mean_dice": ensemble_mean,
        "n_cases": int(len(both)),
        "n_patients": int(both["patient_id"].nunique()),
        "paired_difference": {"what": "student - ensemble, out-of-fold Dice per case", "mean": diff.mean,
                              "ci95": None if diff.ci95 is None else [diff.ci95[0], diff.ci95[1]],
                              "ci95_method": CI_METHOD, "patients_better": diff.wins, "patients_worse": diff.losses,
                              "patients_tied": diff.ties},  # fmt: skip
        "per_fold": per_fold,
        "margin": margin,
        "use_student": use,
        "reason": reason,
    }


# --------------------------------------------------------------------------- the run


def run_distillation(
    model_dir: str | Path,
    manifest: str | Path,
    unlabeled: str | Path | None = None,
    overrides: Sequence[str] = (),
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> DistillResult:
    """Distil the model folder's ensemble (module docstring); returns the written record.

    ``manifest``: the cross-validation pool the model folder was trained on (its pool must be
    ``folds.json``'s); ``unlabeled``: a manifest of further cases for the shipped student only;
    ``overrides``: ``distill.*`` settings (:class:`DistillSettings`) and the students' ``model.*``
    / ``train.*``. Raises ``MedsegError`` subclasses naming the file for bad inputs.
    """
    root = Path(model_dir)
    folder = read_model_folder(root)
    settings_text, student_text = split_overrides(overrides)
    settings: DistillSettings = load_config(None, settings_text, DistillSettings)
    manifest = Path(manifest)
    cfg = student_config(root, student_text, settings, manifest)
    folds = read_folds(root / FOLDS_FILE)
    cases = read_manifest(manifest)
    pool = cv_pool(cases)
    if tuple(sorted(c.case_id for c in pool)) != folds.case_ids:
        raise ManifestError(manifest, [f"its pool (labelled rows outside 'test': {len(pool)} cases) is not the one "
                                       f"{root / FOLDS_FILE} was dealt from ({len(folds.case_ids)} cases); give the "
                                       "manifest the model folder was trained on"])  # fmt: skip
    extra = read_manifest(unlabeled) if unlabeled is not None else []
    channels, modality = list(folder.record.get("channels") or []), str(folder.record.get("modality") or "").upper()
    check_inputs(cfg, pool, extra, channels, modality, manifest, Path(unlabeled) if unlabeled else None)
    ensemble, ensemble_source = ensemble_oof_dice(root)
    plans = plan_students(folds, cases, extra, checkpoints_by_fold(folder))
    eval_cfg = cfg.model_copy(deep=True)
    eval_cfg.evaluation.split = None
    (root / DISTILL_RECORD).unlink(missing_ok=True)  # an interrupted run leaves no record vouching for old files
    with tempfile.TemporaryDirectory(prefix="medseg-distill-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        images = preprocessed_images([*pool, *extra], cfg)
        dice: dict[str, float] = {}
        failures: list[dict[str, str]] = []
        trained: dict[str, dict[str, Any]] = {}
        for plan in plans:
            log.info("distill: student %s on %d case(s), taught by %s", plan.name, len(plan.train_cases),
                     [p.name for p in plan.teachers])  # fmt: skip
            trained[plan.name] = _train_planned(plan, cfg, images, folder.postprocess, settings, work, channels,
                                                modality, manifest, progress)  # fmt: skip
            if plan.fold is not None:
                scores, failed = score_student(work / plan.name / LAST_CHECKPOINT, plan.held_out, folder.postprocess,
                                               eval_cfg, manifest, work / plan.name, progress)  # fmt: skip
                dice.update(scores)
                failures += failed
        record = _record(root, plans, trained, ensemble, ensemble_source, dice, failures, settings, student_text,
                         manifest, unlabeled)  # fmt: skip
        _ship(root, work / FULL_STUDENT / LAST_CHECKPOINT, cfg, record, fold_sha256(folder))
    path = write_json(root / DISTILL_RECORD, record)
    log.info("distill: %s; use_student %s", record["check"]["reason"], record["use_student"])
    return DistillResult(path, record, failures)


def _train_planned(plan: StudentPlan, cfg: Config, images: dict[str, TrainVolume], rule: dict[str, Any],
                   settings: DistillSettings, work: Path, channels: list[str], modality: str, manifest: Path,
                   progress: bool) -> dict[str, Any]:  # fmt: skip
    """Teacher probabilities for ``plan``'s cases, then its student's training."""
    from medseg.inference.runner import load_bundle

    teacher = load_bundle(list(plan.teachers), settings={k: v for k, v in rule.items() if k == "tta"})
    volumes = [with_soft_targets(images[c.case_id], teacher_probabilities(teacher, images[c.case_id]),
                                 settings.soft_floor) for c in plan.train_cases]  # fmt: skip
    del teacher
    return train_student(cfg, work / plan.name, plan.train_cases, volumes, channels, modality, manifest, progress)


def _record(root: Path, plans: list[StudentPlan], trained: dict[str, dict[str, Any]], ensemble: pd.DataFrame,
            ensemble_source: str, dice: dict[str, float], failures: list[dict[str, str]], settings: DistillSettings,
            student_text: list[str], manifest: Path, unlabeled: str | Path | None) -> dict[str, Any]:  # fmt: skip
    per_case = ensemble.rename(columns={"dice": "ensemble_dice"})
    per_case.insert(3, "student_dice", per_case["case_id"].map(dice).astype(float))
    n_failed = int((~per_case["case_id"].isin(list(dice))).sum())  # not predicted or not scored
    check = compare(per_case, settings.margin, n_failed)
    folds = []
    for plan in plans:
        entry = {**plan_bookkeeping(plan), **trained[plan.name]}
        if plan.fold is not None:
            entry.update(next((f for f in check["per_fold"] if f["fold"] == plan.fold), {}))
        folds.append(entry)
    return {
        "format": STUDENT_FORMAT,
        "what": "students distilled from each fold's own model on that fold's training patients, scored on its "
                "held-out patients (out-of-fold), against the ensemble's out-of-fold Dice on the same patients "
                "under the same post-processing rule",  # fmt: skip
        "use_student": check["use_student"],
        "check": check,
        "ensemble_source": ensemble_source,
        "students": folds,
        "per_case": [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
                     for row in per_case.to_dict("records")],  # fmt: skip
        "failures": failures,
        "settings": settings.model_dump(mode="json"),
        "student_overrides": list(student_text),
        "manifest": str(manifest),
        "unlabeled_manifest": None if unlabeled is None else str(unlabeled),
        "student": {},  # filled by _ship
    }


def _ship(root: Path, source: Path, cfg: Config, record: dict[str, Any], teachers: dict[str, str]) -> None:
    """The full student as ``student/last.pt`` (slim) + ``student/config.yaml``; its sha256 and
    ``teachers`` (the fold checkpoints' sha256 by file name) into ``record``."""
    from medseg.models.checkpoint import write_inference_checkpoint

    target = root / STUDENT_CHECKPOINT
    target.parent.mkdir(parents=True, exist_ok=True)
    write_inference_checkpoint(source, target)
    dump_config(cfg, root / STUDENT_DIR / RUN_CONFIG)
    full = next(s for s in record["students"] if s["student"] == FULL_STUDENT)
    record["student"] = {"file": STUDENT_CHECKPOINT, "sha256": sha256_file(target), "config": f"{STUDENT_DIR}/{RUN_CONFIG}",
                         "trained_on_patients": full["trained_on_patients"], "teachers": full["teachers"],
                         "teacher_sha256": teachers}  # fmt: skip


__all__ = ["DistillResult", "DistillSettings", "run_distillation", "teacher_probabilities"]
