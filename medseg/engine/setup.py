"""Checks before training: manifest, splits, modality, channels and the model's input width.

Everything a user can get wrong is found here, before any volume is preprocessed, and
reported as a ``ConfigError``/``ManifestError`` naming the file and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.config import Config
from medseg.errors import ConfigError, ManifestError
from medseg.manifest import Case, read_manifest

if TYPE_CHECKING:
    from medseg.data.volumes import TrainVolume


@dataclass
class TrainingCases:
    """The manifest's labelled ``train`` and ``val`` cases (patient-level splits, as written in
    the manifest), their channel names in input order and their one modality."""

    manifest: Path
    train: list[Case]
    val: list[Case]
    channels: list[str]
    modality: str


@dataclass
class PreparedData:
    """Training data the caller has built (distillation, :mod:`medseg.auto.distill`): the cases
    (channels and modality for the checkpoint's contract), and their preprocessed volumes, in
    the same order, each with its targets (``TrainVolume.soft_label``: the teacher's
    probabilities). The trainer then reads no manifest and loads no volume; with no ``val``
    volumes it validates nothing and keeps the last epoch's weights."""

    cases: TrainingCases
    train: list[TrainVolume]
    val: list[TrainVolume]


def expected_in_channels(n_channels: int, context_slices: int) -> int:
    """Model input width of 2.5D stacks: channels x (2k + 1) slices."""
    return n_channels * (2 * context_slices + 1)


def check_training_setup(cfg: Config, fold: int | None = None, folds_dir: str | Path | None = None) -> TrainingCases:
    """Read ``data.manifest`` and check it against the config; raise before any training work.

    Without ``fold`` the manifest's ``train`` and ``val`` rows are used. With ``fold`` k
    (cross-validation, :mod:`medseg.auto.folds`): the pool (labelled rows not in ``test``) is dealt
    into ``cfg.cv.folds`` patient-level folds stored in ``folds_dir/folds.json`` (created on
    first use, reused after); fold k's patients are the validation (held-out) cases and the
    other folds train.

    Checks: the manifest reads (columns, files, a patient's rows in one split: ``read_manifest``;
    folds are patient-level by construction), it has ``train`` cases, one modality across
    the training and validation rows, ``model.in_channels`` = channels x (2 *
    ``preprocess.context_slices`` + 1), and ``model.out_channels`` is 1 (sigmoid) or 2
    (softmax) for the binary lesion masks that preprocessing produces.
    """
    manifest = Path(cfg.data.manifest)
    cases = read_manifest(manifest)
    if fold is not None:
        from medseg.auto.folds import FOLDS_FILE, load_or_create_folds

        if folds_dir is None:
            raise ConfigError(f"a fold needs the folder that holds (or will hold) its {FOLDS_FILE}")
        folds = load_or_create_folds(folds_dir, cases, cfg.cv.folds, cfg.cv.seed, manifest)
        train, val = folds.split(cases, fold)
    else:
        train = [c for c in cases if c.split == "train"]
        val = [c for c in cases if c.split == "val"]
    if not train:
        raise ManifestError(manifest, ["no row has split 'train'; assign splits (e.g. medseg import ... --val-fraction 0.2)"])
    modalities = sorted({c.modality for c in train + val})
    if len(modalities) > 1:
        counts = ", ".join(f"{m}: {sum(c.modality == m for c in train + val)} rows" for m in modalities)
        raise ManifestError(
            manifest,
            [f"training needs one modality, but the train/val rows mix {counts}; write one manifest per modality"],
        )
    channels = train[0].channels
    k = cfg.preprocess.context_slices
    expected = expected_in_channels(len(channels), k)
    if cfg.model.in_channels != expected:
        raise ConfigError(
            f"model.in_channels is {cfg.model.in_channels}, but {manifest} has {len(channels)} channel(s) "
            f"{channels} x (2 * preprocess.context_slices + 1 = {2 * k + 1}) slices = {expected} inputs; "
            f"set model.in_channels: {expected}"
        )
    if cfg.model.out_channels > 2:
        raise ConfigError(
            f"model.out_channels is {cfg.model.out_channels}, but training labels are binary lesion masks "
            "(data.labels); use 1 (sigmoid) or 2 (softmax)"
        )
    return TrainingCases(manifest, train, val, channels, modalities[0])
