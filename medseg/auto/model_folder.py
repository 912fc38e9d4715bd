"""A trained model as one folder: fold checkpoints + plan + folds + chosen post-processing.

``medseg infer --model DIR`` loads it as one thing: the fold models form an ensemble whose
probabilities are averaged (:func:`medseg.inference.runner.load_bundle`), and the
post-processing chosen on cross-validation (``postprocess.json``) becomes the inference
settings, under any ``--set inference.KEY=VALUE`` the user adds.

Layout (written by the ``postprocess`` stage of ``pipelines/auto.yaml``, or by
:func:`write_model_folder`)::

    model.json              what is here: format, medseg version, fold checkpoints with sha256,
                            channels, modality, the post-processing rule, the CV summary line
    fold_0.pt ... fold_N.pt slim inference checkpoints (no optimiser state), one per fold
                            (+ fold_<k>_r<r>.pt for ``cv.repeats`` > 1)
    config.yaml             the config the folds were trained with (the plan)
    folds.json              the patient-level fold assignment (:mod:`medseg.auto.folds`)
    postprocess.json        the rule chosen on the out-of-fold predictions and why
    postprocess_candidates.csv, cv_summary.json   the evidence behind it
    fingerprint.json        the plan's dataset fingerprint (part of the model's identity)
    qc.json                 the QC score's calibration on the out-of-fold predictions (medseg.review)
    student/ + distill.json optional (``medseg distill``, :mod:`medseg.auto.distill`): one network
                            distilled from the ensemble, and its out-of-fold check; used only when
                            the record says so and the checkpoint's sha256 matches (:func:`read_student`)

Nothing in it names a patient except by the manifest's ids (folds.json lists case and patient
ids as the manifest gives them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg import __version__
from medseg.atomic import copy_file, sha256_file, write_json
from medseg.errors import MedsegError
from medseg.outputs import (
    CV_CHOSEN_DIR,
    CV_SUMMARY,
    DISTILL_RECORD,
    LAST_CHECKPOINT,
    MODEL_RECORD,
    POSTPROCESS_RULE_KEYS,
    RUN_CONFIG,
    STUDENT_DIR,
)
from medseg.text_input import read_user_json

FORMAT = "medseg-model-folder"
FORMAT_VERSION = 1
POSTPROCESS_KEYS = (*POSTPROCESS_RULE_KEYS, "tta")  # the rule chosen on CV, and test-time mirroring when cv.try_tta kept it


@dataclass(frozen=True)
class ModelFolder:
    """A read model folder: absolute checkpoint paths, the post-processing rule (inference keys)
    and the whole ``model.json`` record."""

    path: Path
    checkpoints: list[Path]
    postprocess: dict[str, Any]
    record: dict[str, Any]


def write_model_folder(
    out_dir: str | Path,
    fold_checkpoints: Sequence[str | Path],
    config_file: str | Path,
    folds_file: str | Path,
    postprocess: dict[str, Any] | None = None,
    extra_files: Sequence[str | Path] = (),
    summary: dict[str, Any] | None = None,
    names: Sequence[str] | None = None,
) -> Path:
    """Assemble a model folder in ``out_dir`` (layout: module docstring); returns ``model.json``.

    Each fold checkpoint is written as a slim inference checkpoint named ``names[k]`` (default
    ``fold_<k>.pt``); the config, folds and ``extra_files`` are copied; ``postprocess``
    (inference keys) is recorded in ``model.json``. Every file is written atomically,
    ``model.json`` last, so a folder without it is incomplete.
    """
    from medseg.models.checkpoint import load_checkpoint, write_inference_checkpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_RECORD).unlink(missing_ok=True)
    checkpoints = []
    channels = modality = None
    names = list(names) if names is not None else [f"fold_{k}.pt" for k in range(len(fold_checkpoints))]
    if len(names) != len(fold_checkpoints) or len(set(names)) != len(names):
        raise ValueError(f"{len(fold_checkpoints)} checkpoints need as many distinct names, got {names}")
    for source, name in zip(fold_checkpoints, names, strict=True):
        target = out / name
        write_inference_checkpoint(source, target)
        extra = load_checkpoint(target).get("extra", {})
        channels, modality = extra.get("channels"), extra.get("modality")
        checkpoints.append({"file": target.name, "sha256": sha256_file(target), "epoch": extra.get("epoch")})
    for source in (config_file, folds_file, *extra_files):
        source = Path(source)
        copy_file(source, out / source.name)
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "medseg_version": __version__,
        "checkpoints": checkpoints,
        "channels": channels,
        "modality": modality,
        "config": Path(config_file).name,
        "folds": Path(folds_file).name,
        "postprocess": dict(postprocess or {}),
        "summary": summary or {},
    }
    return write_json(out / MODEL_RECORD, record)


def read_model_folder(path: str | Path) -> ModelFolder:
    """Read ``path/model.json`` and check that every checkpoint it lists exists with its sha256.

    Each checkpoint entry must name a plain file inside the folder (not ``../x.pt``, not an
    absolute path, not a link leading out of the folder) and carry its sha256: only the files
    the folder holds and vouches for are loaded.
    Raises ``MedsegError`` naming the file for a missing/incomplete folder, an unknown format,
    a missing or altered checkpoint, an entry that breaks those rules, or a post-processing rule
    with keys ``infer`` does not know.
    """
    folder = Path(path)
    record_path = folder / MODEL_RECORD
    if not folder.is_dir():
        raise MedsegError(f"{folder}: model folder not found")
    if not record_path.is_file():
        raise MedsegError(f"{folder}: no {MODEL_RECORD} (not a medseg model folder, or its writing was interrupted)")
    record = read_user_json(record_path, MedsegError)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise MedsegError(f"{record_path}: not a medseg model folder record (format {FORMAT!r} expected)")
    if record.get("format_version") != FORMAT_VERSION:
        raise MedsegError(f"{record_path}: format version {record.get('format_version')!r} is not supported")
    entries = record.get("checkpoints") or []
    if not entries:
        raise MedsegError(f"{record_path}: lists no checkpoint")
    if not isinstance(entries, list):
        raise MedsegError(f"{record_path}: 'checkpoints' must be a list of {{file, sha256}} entries")
    checkpoints = [_checkpoint_entry(folder, record_path, n, entry) for n, entry in enumerate(entries, start=1)]
    rule = record.get("postprocess") or {}
    unknown = sorted(set(rule) - set(POSTPROCESS_KEYS))
    if unknown:
        raise MedsegError(f"{record_path}: unknown post-processing key(s) {unknown}; known: {list(POSTPROCESS_KEYS)}")
    return ModelFolder(folder, checkpoints, dict(rule), record)


def _checkpoint_entry(folder: Path, record_path: Path, number: int, entry: Any) -> Path:
    """The checkpoint file of ``model.json``'s entry ``number``, checked: a plain file name inside
    the folder (no ``..``, no absolute path, no link leading out of it: a model folder loads only
    files it holds) with the sha256 it must have (required)."""
    if not isinstance(entry, dict):
        raise MedsegError(f"{record_path}: checkpoint entry {number} is not a {{file, sha256}} object")
    name = entry.get("file")
    what = f"{record_path}: checkpoint entry {number} ({name!r})"
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or Path(name).is_absolute() or Path(name).name != name:
        raise MedsegError(f"{what}: 'file' must be a plain file name inside the model folder (no folders, no "
                          "'..', no absolute path)")  # fmt: skip
    file = folder / name
    if not file.is_file():
        raise MedsegError(f"{file}: checkpoint listed in {record_path} not found")
    root = folder.resolve()
    if file.resolve().parent != root:
        raise MedsegError(f"{what}: the file is a link to {file.resolve()}, outside the model folder; copy the "
                          "checkpoint into the folder")  # fmt: skip
    expected = entry.get("sha256")
    if not isinstance(expected, str) or len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected.lower()):
        raise MedsegError(f"{what}: no sha256 (64 hex digits) for the checkpoint; every checkpoint of a model folder "
                          "needs one (medseg writes it; add it with sha256sum only for a file you trust)")  # fmt: skip
    if sha256_file(file) != expected.lower():
        raise MedsegError(f"{file}: sha256 differs from the one in {record_path} (file replaced or damaged)")
    return file


CV_SUMMARY_FILES = (f"{CV_CHOSEN_DIR}/{CV_SUMMARY}", CV_SUMMARY)  # the chosen rule's scores first
FINGERPRINT_FILE = "fingerprint.json"


def model_identity(checkpoints: Sequence[str | Path], folder: str | Path | None = None) -> dict[str, Any]:
    """What a run's record names as the model that ran: every checkpoint file with its sha256 and,
    for a model folder, the folder, the sha256 of the plan's dataset fingerprint
    (``fingerprint.json``, when the folder holds it) and the cross-validated accuracy (mean Dice /
    HD95 with their 95 % intervals, from ``cv_chosen/cv_summary.json`` or ``cv_summary.json``).
    Missing pieces are ``None``, never guessed."""
    identity: dict[str, Any] = {
        "checkpoints": [{"file": str(p), "sha256": sha256_file(p)} for p in map(Path, checkpoints)],
        "model_folder": None,
        "dataset_fingerprint_sha256": None,
        "cv_accuracy": None,
    }
    if folder is None:
        return identity
    root = Path(folder)
    identity["model_folder"] = str(root)
    if (root / FINGERPRINT_FILE).is_file():
        identity["dataset_fingerprint_sha256"] = sha256_file(root / FINGERPRINT_FILE)
    for name in CV_SUMMARY_FILES:
        try:
            summary = json.loads((root / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        metrics = summary.get("metrics", {}) if isinstance(summary, dict) else {}
        identity["cv_accuracy"] = {
            "source": name,
            "what": summary.get("what"),
            "n_cases": summary.get("n_cases"),
            "n_folds": summary.get("n_folds"),
            **{f"{m}_{k}": metrics.get(m, {}).get(k) for m in ("dice", "hd95_mm") for k in ("mean", "ci95")},
        }
        break
    return identity


@dataclass(frozen=True)
class ModelInputs:
    """What a model takes: its input channel names (in order) and the modality it was trained on."""

    channels: list[str]
    modality: str
    source: Path


def read_model_inputs(path: str | Path) -> ModelInputs:
    """The channels and modality of a model folder (from ``model.json``) or of a checkpoint file
    (its stored contract), without building the network. Raises ``MedsegError`` naming the file."""
    source = Path(path)
    if source.is_dir():
        record = read_model_folder(source).record
        channels, modality, named = record.get("channels"), record.get("modality"), source / MODEL_RECORD
    else:
        from medseg.models.checkpoint import load_checkpoint

        extra = load_checkpoint(source).get("extra")
        extra = extra if isinstance(extra, dict) else {}
        channels, modality, named = extra.get("channels"), extra.get("modality"), source
    if not isinstance(channels, list) or not channels or str(modality).upper() not in ("CT", "MR"):
        raise MedsegError(f"{named}: names no input channels and CT/MR modality (channels {channels!r}, "
                          f"modality {modality!r}); write it with medseg train or pipelines/auto.yaml")
    return ModelInputs([str(c) for c in channels], str(modality).upper(), source)


FOLD_CHECKPOINT = re.compile(r"(?:^|_)fold_(\d+)(?:_r(\d+))?\.pt$")  # [<candidate>_]fold_<k>[_r<r>].pt
STUDENT_FORMAT = "medseg-distill"
STUDENT_CHECKPOINT = f"{STUDENT_DIR}/{LAST_CHECKPOINT}"  # the student's weights after its last epoch, slim


def checkpoints_by_fold(folder: ModelFolder) -> dict[int, list[Path]]:
    """The folder's checkpoints grouped by the cross-validation fold whose patients they did not
    see: ``fold_<k>.pt``, its repeats ``fold_<k>_r<r>.pt`` and a chosen candidate's
    ``<name>_fold_<k>.pt`` all belong to fold k (the names :func:`write_model_folder` is given by
    the ``postprocess`` stage). Raises ``MedsegError`` naming a checkpoint whose name says no fold."""
    groups: dict[int, list[Path]] = {}
    for path in folder.checkpoints:
        fold = fold_of_checkpoint(path)
        if fold is None:
            raise MedsegError(f"{path}: the name says no cross-validation fold (fold_<k>.pt expected), so which "
                              "patients the model saw is unknown")  # fmt: skip
        groups.setdefault(fold, []).append(path)
    return dict(sorted(groups.items()))


def fold_of_checkpoint(path: str | Path) -> int | None:
    """The cross-validation fold whose patients the checkpoint ``[<candidate>_]fold_<k>[_r<r>].pt``
    did not see (k), or ``None`` when its name says no fold."""
    match = FOLD_CHECKPOINT.search(Path(path).name)
    return None if match is None else int(match.group(1))


@dataclass(frozen=True)
class StudentRecord:
    """A distilled student that may stand in for the ensemble: its checkpoint (sha256 checked),
    its config file and the whole ``distill.json`` record."""

    checkpoint: Path
    config: Path
    record: dict[str, Any]


def fold_sha256(folder: ModelFolder) -> dict[str, str]:
    """Each fold checkpoint's sha256 by file name, as ``model.json`` lists it (checked on reading)."""
    return {Path(entry["file"]).name: entry["sha256"] for entry in folder.record["checkpoints"]}


def read_student(model: ModelFolder) -> StudentRecord | None:
    """The model folder's distilled student when its ``distill.json`` says ``use_student: true``,
    else ``None`` (no record, or the student lost the out-of-fold check). ``model``: the folder as
    :func:`read_model_folder` read it (its fold checkpoints' sha256 already checked).

    The checkpoint must be the file the record vouches for: ``student/last.pt`` with the sha256
    written there, distilled from the fold checkpoints the folder holds now; a changed, missing
    or unvouched checkpoint raises ``MedsegError`` naming the file (never a silent fall-back to a
    file nobody checked). A record of another format also raises."""
    folder = model.path
    record_path = folder / DISTILL_RECORD
    if not record_path.is_file():
        return None
    record = read_user_json(record_path, MedsegError)
    if not isinstance(record, dict) or record.get("format") != STUDENT_FORMAT:
        raise MedsegError(f"{record_path}: not a medseg distillation record (format {STUDENT_FORMAT!r} expected)")
    if record.get("use_student") is not True:
        return None
    student = record.get("student")
    expected = student.get("sha256") if isinstance(student, dict) else None
    checkpoint, config = folder / STUDENT_CHECKPOINT, folder / STUDENT_DIR / RUN_CONFIG
    if not isinstance(expected, str) or len(expected) != 64:
        raise MedsegError(f"{record_path}: 'student.sha256' (64 hex digits) missing; the student is not vouched for")
    if not checkpoint.is_file() or checkpoint.resolve().parent != (folder / STUDENT_DIR).resolve():
        raise MedsegError(f"{checkpoint}: student checkpoint named in {record_path} not found in the model folder")
    if sha256_file(checkpoint) != expected.lower():
        raise MedsegError(f"{checkpoint}: sha256 differs from the one in {record_path} (file replaced or damaged); "
                          "run medseg distill again or delete the record")  # fmt: skip
    teachers = student.get("teacher_sha256")
    if teachers != fold_sha256(model):
        raise MedsegError(f"{record_path}: the student was distilled from other fold checkpoints than {folder / MODEL_RECORD} "
                          "lists now (folds retrained or replaced); run medseg distill again, or inference.student=off")  # fmt: skip
    return StudentRecord(checkpoint, config, record)
