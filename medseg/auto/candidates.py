"""Configurations chosen on cross-validation (nnU-Net's "find best configuration").

``cv.candidates`` names several networks / training recipes (each a few ``model.*`` /
``train.*`` settings over the run's config). The ``cv`` stage runs the full cross-validation of
each candidate on the same patient folds and budget into ``cv/candidates/<name>/``; this module
then chooses, on the out-of-fold probabilities alone:

1. the best single candidate (highest mean out-of-fold Dice; ties: the order of
   ``cv.candidates``);
2. with ``cv.ensemble_pairs``, the best pair of candidates (their probabilities averaged) --
   shipped instead only when its mean Dice beats the best single one by more than
   ``cv.selection_min_gain`` (twice the inference cost must buy something);
3. with ``cv.try_tta``, test-time mirroring (``inference.tta``: in-plane flips averaged) of the
   chosen combination, kept under the same rule (it costs 4x the inference).

Every case is scored with the run's own post-processing rule (``inference``; the
``postprocess`` stage then chooses the rule on the chosen combination), Dice as
:mod:`medseg.metrics.voxel` (1 when both are empty). Each step states the paired per-patient
difference with its 95 % patient-bootstrap interval (:mod:`medseg.metrics.uncertainty`) and
wins / losses. The pair's probabilities are averaged on the label grid (the saved maps); the
shipped ensemble averages them on the network's grid before resampling -- the same up to
interpolation rounding.

Files (``cv/``): ``candidates.json`` (the chosen names, tta, reasons, the steps' paired
intervals) and ``candidates_table.csv`` (one row per combination: mean Dice, interval, wins
against the best single candidate); the chosen combination's averaged probabilities become
``cv/oof/`` so that the rest of the pipeline (post-processing choice, model folder, report)
reads one out-of-fold set whatever was chosen.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medseg.config import CandidateConfig, Config
from medseg.errors import ConfigError, MedsegError
from medseg.manifest import Case
from medseg.metrics import uncertainty
from medseg.metrics.uncertainty import bootstrap_mean_ci
from medseg.outputs import CANDIDATES_CHOICE, CANDIDATES_TABLE

CANDIDATES_DIR = "candidates"
TTA_SUFFIX = "+tta"


def candidate_config(cfg: Config, candidate: CandidateConfig) -> Config:
    """``cfg`` with the candidate's dotted ``set`` applied (``model.*`` / ``train.*`` only: the
    candidates of one ensemble share data, preprocessing and inference), validated again."""
    from pydantic import ValidationError

    from medseg.config import format_validation_error, set_dotted

    tree = cfg.model_dump(mode="json")
    for key, value in candidate.set.items():
        set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(f"cv.candidates[{candidate.name}]", exc)) from None


def candidate_dir(cv_dir: str | Path, name: str) -> Path:
    return Path(cv_dir) / CANDIDATES_DIR / name


def combination_name(names: Sequence[str], tta: bool = False) -> str:
    """``deeplab`` / ``deeplab+unet`` / ``deeplab+unet+tta``."""
    return "+".join(names) + (TTA_SUFFIX if tta else "")


@dataclass
class CandidateChoice:
    """What :func:`choose_combination` chose. ``names``: the chosen candidates (1 or 2);
    ``tta``: mirroring kept; ``reasons``: one line per step; ``steps``: each step's paired
    comparison (:func:`paired_difference`); ``table``: one row per scored combination."""

    names: tuple[str, ...]
    tta: bool
    reasons: list[str]
    steps: list[dict[str, Any]] = field(default_factory=list)
    table: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def name(self) -> str:
        return combination_name(self.names, self.tta)


def paired_difference(a: np.ndarray, b: np.ndarray, patients: Sequence[str]) -> dict[str, Any]:
    """``a - b`` (Dice of two combinations on the same cases) as a JSON record:
    :func:`medseg.metrics.uncertainty.paired_difference`'s mean, 95 % patient-bootstrap interval
    (None under 3 patients) and patients better (wins) / worse (losses) / tied."""
    d = uncertainty.paired_difference(a, b, patients)
    return {"mean": d.mean, "ci95": None if d.ci95 is None else [d.ci95[0], d.ci95[1]],
            "wins": d.wins, "losses": d.losses, "ties": d.ties}


def _fmt_diff(d: dict[str, Any]) -> str:
    ci = d["ci95"]
    interval = f", 95 % CI {ci[0]:+.3f} to {ci[1]:+.3f}" if ci else ""
    return f"{d['mean']:+.4f}{interval}, {d['wins']} better / {d['losses']} worse"


def choose_combination(dice: pd.DataFrame, patients: Sequence[str], order: Sequence[str], pairs: bool,
                       min_gain: float) -> CandidateChoice:
    """Choose single / pair on per-case out-of-fold Dice (module docstring, steps 1-2).

    ``dice``: one row per case, one column per combination name (:func:`combination_name`;
    singles named as in ``order``, pairs ``a+b`` in ``order``'s order); ``patients``: each
    row's patient id. Raises ``MedsegError`` when a single candidate has no column."""
    missing = [n for n in order if n not in dice.columns]
    if missing:
        raise MedsegError(f"out-of-fold Dice missing for candidate(s) {missing}")
    means = dice.mean(axis=0, skipna=True)
    best_single = max(order, key=lambda n: (means[n], -list(order).index(n)))
    names: tuple[str, ...] = (best_single,)
    reasons = [f"best single candidate {best_single}: mean out-of-fold Dice {means[best_single]:.4f} ("
               + ", ".join(f"{n} {means[n]:.4f}" for n in order) + ")"]
    steps: list[dict[str, Any]] = []
    pair_names = [combination_name(p) for p in itertools.combinations(order, 2)]
    if pairs and pair_names:
        best_pair = max(pair_names, key=lambda n: (means[n], -pair_names.index(n)))
        d = paired_difference(dice[best_pair].to_numpy(), dice[best_single].to_numpy(), patients)
        steps.append({"step": "pair", "a": best_pair, "b": best_single, **d})
        if d["mean"] > min_gain:
            names = tuple(best_pair.split("+"))
            reasons.append(f"pair {best_pair} averaged: {_fmt_diff(d)} over {best_single} (> {min_gain:g}): shipped")
        else:
            reasons.append(f"best pair {best_pair}: {_fmt_diff(d)} over {best_single} (needs > {min_gain:g}): "
                           "the single candidate is shipped")
    table = _table(dice, patients, best_single)
    return CandidateChoice(names, False, reasons, steps, table)


def choose_tta(choice: CandidateChoice, without: np.ndarray, with_tta: np.ndarray, patients: Sequence[str],
               min_gain: float) -> CandidateChoice:
    """Step 3: keep mirroring when its mean out-of-fold Dice gain exceeds ``min_gain``."""
    d = paired_difference(with_tta, without, patients)
    keep = d["mean"] > min_gain
    choice.steps.append({"step": "tta", "a": combination_name(choice.names, True), "b": choice.name, **d})
    choice.reasons.append(f"test-time mirroring: {_fmt_diff(d)} "
                          + (f"(> {min_gain:g}): kept" if keep else f"(needs > {min_gain:g}): not used"))
    choice.tta = keep
    return choice


def _table(dice: pd.DataFrame, patients: Sequence[str], reference: str) -> pd.DataFrame:
    rows = []
    for name in dice.columns:
        values = dice[name].to_numpy(float)
        ci = bootstrap_mean_ci(values, list(patients))
        d = paired_difference(values, dice[reference].to_numpy(float), patients)
        rows.append({"combination": name, "n_models_per_fold": name.count("+") + 1 - name.endswith(TTA_SUFFIX),
                     "mean_dice": float(np.nanmean(values)), "ci95_low": ci[0] if ci else np.nan,
                     "ci95_high": ci[1] if ci else np.nan, f"minus_{reference}": d["mean"],
                     "diff_ci95_low": d["ci95"][0] if d["ci95"] else np.nan,
                     "diff_ci95_high": d["ci95"][1] if d["ci95"] else np.nan, "wins": d["wins"], "losses": d["losses"]})
    return pd.DataFrame(rows).sort_values("mean_dice", ascending=False, kind="stable").reset_index(drop=True)


def score_combinations(cases: Sequence[Case], prob_dirs: dict[str, Path], combos: Sequence[Sequence[str]],
                       cfg: Config) -> pd.DataFrame:
    """Per-case Dice (rows: ``cases``' ids) of each combination in ``combos`` (names of
    ``prob_dirs``: a candidate's out-of-fold folder), the averaged probabilities post-processed
    with ``cfg.inference``. Each probability map is read once per case."""
    from medseg.inference.postprocess import postprocess
    from medseg.io import check_same_grid, read_volume
    from medseg.labels import read_label
    from medseg.metrics.voxel import voxel_metrics
    from medseg.outputs import prob_file

    rows = []
    for case in cases:
        if case.label is None:
            raise MedsegError(f"case {case.case_id}: candidates are compared on labelled cases only")
        label = read_label(case.label, cfg.data.labels)
        probs = {}
        for name, folder in prob_dirs.items():
            volume = read_volume(prob_file(folder, case.case_id))
            check_same_grid(volume, label, context=f"out-of-fold probability of {name}, case {case.case_id}")
            probs[name] = volume.array.astype(np.float32, copy=False)
        row = {"case_id": case.case_id}
        for combo in combos:
            prob = probs[combo[0]] if len(combo) == 1 else np.mean([probs[n] for n in combo], axis=0)
            mask = postprocess(prob, label.spacing, cfg.inference).astype(bool)
            row[combination_name(combo)] = voxel_metrics(mask, label.array > 0, label.spacing, distances=False).dice
        rows.append(row)
    return pd.DataFrame(rows).set_index("case_id")


def write_choice(choice: CandidateChoice, cv_dir: str | Path, candidates: Sequence[CandidateConfig]) -> Path:
    """``candidates.json`` and ``candidates_table.csv`` in ``cv_dir``, atomically."""
    from medseg.atomic import write_csv, write_json

    out = Path(cv_dir)
    write_csv(out / CANDIDATES_TABLE, choice.table)
    return write_json(out / CANDIDATES_CHOICE, {
        "chosen": list(choice.names), "tta": choice.tta, "name": choice.name, "reasons": choice.reasons,
        "steps": choice.steps, "candidates": [c.model_dump(mode="json") for c in candidates],
    })


def read_choice(cv_dir: str | Path) -> dict[str, Any] | None:
    """The ``candidates.json`` of a cv folder, or None when the run had no candidates."""
    path = Path(cv_dir) / CANDIDATES_CHOICE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedsegError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not data.get("chosen"):
        raise MedsegError(f"{path}: no 'chosen' candidates")
    return data
