"""The bookkeeping of distillation (:mod:`medseg.auto.distill`), pure: which student learns from
which patients and which teachers, the decision to use it, and the record's numbers.

Students and what each may see (fold k of ``folds.json``; ``T_k`` = fold k's training
patients, ``H_k`` = its held-out patients):

==============  ===========================================  =============================  ============
student         trains on (images + teacher probabilities)   teachers                       scored on
==============  ===========================================  =============================  ============
``fold_<k>``    the pool cases of ``T_k`` only               fold k's model(s): ``fold_<k>``  ``H_k``
                                                             and its repeats, which never
                                                             saw ``H_k`` (every other fold's
                                                             model trained on ``H_k``)
``full``        every pool case + the unlabeled cases        every fold model (the ensemble  nothing (it
                                                             ``medseg infer --model`` runs)  is shipped)
==============  ===========================================  =============================  ============

No student reads a reference label: its targets are its teachers' probabilities. The check
compares, case by case on the same pool patients, the fold students' out-of-fold Dice with the
ensemble's out-of-fold Dice of cross-validation (same patients, same post-processing rule), and
the student is used when ``mean(student) >= mean(ensemble) - margin``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from medseg.auto.folds import FoldAssignment, cv_pool
from medseg.config import StrictModel
from medseg.errors import ConfigError
from medseg.manifest import Case

FULL_STUDENT = "full"
STUDENT_SECTIONS = ("model", "train")  # what --set may change for the students (the teacher fixes the rest)


class DistillSettings(StrictModel):
    """``medseg distill`` settings (``--set distill.KEY=VALUE``).

    ``margin``: the students' mean out-of-fold Dice may be at most this much below the
    ensemble's for ``use_student: true``. ``minutes``: time budget of each student's training
    (``train.max_minutes``; ``null``: the plan's). ``soft_floor``: teacher probabilities below
    it become 0 in the targets -- the lesion-centred crop then centres on the teacher's lesion and
    its uncertain rim rather than on any pixel, and the soft Dice does not sum the background's
    tiny probabilities.
    """

    margin: float = Field(default=0.005, ge=0.0, le=1.0)
    minutes: float | None = Field(default=None, gt=0.0)
    soft_floor: float = Field(default=0.01, ge=0.0, lt=0.5)


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--set`` texts -> (``distill.*`` without the prefix, the students' ``model.*`` /
    ``train.*``). Other sections are refused (``ConfigError``): preprocessing, labels and
    inference are the teacher's, so that its probabilities are targets on the student's grid."""
    settings, student = [], []
    for text in overrides:
        key = text.split("=", 1)[0]
        section = key.split(".", 1)[0]
        if section == "distill":
            settings.append(text.split(".", 1)[1] if "." in key else text)
        elif section in STUDENT_SECTIONS and "." in key:
            student.append(text)
        else:
            raise ConfigError(f"--set {text!r}: medseg distill takes distill.<key> and the student's "
                              f"{' / '.join(s + '.<key>' for s in STUDENT_SECTIONS)} settings; preprocessing, labels "
                              "and inference are the model folder's")  # fmt: skip
    return settings, student


@dataclass(frozen=True)
class StudentPlan:
    """One student: ``name`` (``fold_<k>`` or ``full``), its fold (``None`` for the shipped one),
    the cases whose images and teacher probabilities it trains on, its teacher checkpoints, and
    the held-out cases it is scored on."""

    name: str
    fold: int | None
    train_cases: tuple[Case, ...]
    teachers: tuple[Path, ...]
    held_out: tuple[Case, ...]


def plan_students(
    folds: FoldAssignment, cases: Sequence[Case], unlabeled: Sequence[Case], by_fold: Mapping[int, Sequence[Path]]
) -> list[StudentPlan]:
    """The fold students ``fold_0 .. fold_<n-1>`` and the shipped ``full`` student (module
    docstring). ``cases``: the manifest (its pool is the model folder's); ``by_fold``: teacher
    checkpoints by the fold whose patients they did not see. ``ConfigError`` when a fold has no
    model."""
    missing = [k for k in range(folds.n_folds) if not by_fold.get(k)]
    if missing:
        raise ConfigError(f"the model folder has no checkpoint for fold(s) {missing} of its {folds.n_folds} folds")
    plans = []
    for k in range(folds.n_folds):
        train, held = folds.split(cases, k)
        plans.append(StudentPlan(f"fold_{k}", k, tuple(train), tuple(by_fold[k]), tuple(held)))
    everything = tuple(p for k in sorted(by_fold) for p in by_fold[k])
    plans.append(StudentPlan(FULL_STUDENT, None, (*cv_pool(cases), *unlabeled), everything, ()))
    return plans


def student_decision(student_mean: float, ensemble_mean: float, margin: float, n_failed: int = 0) -> tuple[bool, str]:
    """``(use_student, reason)``: the student is used when its mean out-of-fold Dice is at least
    the ensemble's minus ``margin`` (both finite) and no held-out case failed."""
    if n_failed:
        return False, f"{n_failed} held-out case(s) could not be predicted or scored by their fold's student"
    if not (math.isfinite(student_mean) and math.isfinite(ensemble_mean)):
        return False, "no out-of-fold Dice to compare"
    verdict = student_mean >= ensemble_mean - margin
    relation = ">=" if verdict else "<"
    return verdict, (f"students' mean out-of-fold Dice {student_mean:.4f} {relation} ensemble's {ensemble_mean:.4f} "
                     f"- margin {margin:g}")  # fmt: skip


def plan_bookkeeping(plan: StudentPlan) -> dict[str, Any]:
    """What a student saw, by ids only (the record's audit trail)."""
    return {
        "student": plan.name,
        "fold": plan.fold,
        "trained_on_patients": sorted({c.patient_id for c in plan.train_cases}),
        "trained_on_cases": sorted(c.case_id for c in plan.train_cases),
        "teachers": [p.name for p in plan.teachers],
        "held_out_patients": sorted({c.patient_id for c in plan.held_out}),
    }
