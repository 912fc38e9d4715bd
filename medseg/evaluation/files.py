"""The files evaluation reads for one case: its predicted mask and optional score files in the
prediction folder (named in :mod:`medseg.outputs`, the contract), and its reference label.

Per case a mask (required), a probability map and a lesion instance map with its table
(optional; a map without its table, or the reverse, is ignored with a warning). Every file must
lie on the reference's grid; a predicted mask, instance map or reference with non-integer or
negative values is refused naming the file. What the arrays become: :mod:`medseg.metrics.case_scores`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medseg.errors import InputFileError, MedsegError
from medseg.io import Volume, check_same_grid, read_volume
from medseg.manifest import Case, case_id_problem
from medseg.metrics.case_scores import CaseArrays
from medseg.metrics.lesion_scores import ScoreSource
from medseg.outputs import LESIONS_CSV_SUFFIX, LESIONS_SUFFIX, MASK_SUFFIX, PROB_SUFFIX

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictionFiles:
    """Paths of one case's prediction files (``None`` where an optional file is absent)."""

    mask: Path
    prob: Path | None
    lesions: Path | None
    lesions_csv: Path | None


# the longest name evaluation reads beyond a case id (a longer id cannot name its prediction)
_READ_NAME_EXTRA = max(len(s.encode()) for s in (MASK_SUFFIX, PROB_SUFFIX, LESIONS_SUFFIX, LESIONS_CSV_SUFFIX))


def prediction_files(pred_dir: Path, case_id: str) -> PredictionFiles:
    """Locate a case's files per the contract; ``MedsegError`` when the id is too long to name
    them, ``InputFileError`` when the mask is missing or a folder stands in its place."""
    problem = case_id_problem(case_id, name_extra=_READ_NAME_EXTRA)
    if problem is not None:
        raise MedsegError(problem)
    mask = pred_dir / f"{case_id}{MASK_SUFFIX}"
    if mask.is_dir():
        raise InputFileError(mask, f"a folder is where case {case_id}'s predicted mask should be; remove or rename it")
    if not mask.is_file():
        raise InputFileError(
            mask, f"prediction for case {case_id!r} not found (expected <case_id>{MASK_SUFFIX} in {pred_dir})"
        )

    def optional(suffix: str) -> Path | None:
        p = pred_dir / f"{case_id}{suffix}"
        return p if p.is_file() else None

    lesions, lesions_csv = optional(LESIONS_SUFFIX), optional(LESIONS_CSV_SUFFIX)
    if (lesions is None) != (lesions_csv is None):
        present = lesions or lesions_csv
        log.warning("%s: lesion instance map and CSV come together; this one is ignored", present)
        lesions = lesions_csv = None
    return PredictionFiles(mask, optional(PROB_SUFFIX), lesions, lesions_csv)



def has_prediction(pred_dir: Path, case_id: str) -> bool:
    """Whether ``pred_dir`` holds something under ``case_id``'s mask name (a file, or a folder
    that then fails the case); an id that cannot name a file counts, so its case fails saying why."""
    try:
        return (pred_dir / f"{case_id}{MASK_SUFFIX}").exists()
    except (OSError, ValueError):
        return True


def integer_array(volume: Volume, what: str, hint: str = "") -> np.ndarray:
    """``volume.array`` as an integer array; InputFileError for non-integer values (``hint``
    follows the message, e.g. `` (a probability map?)``)."""
    arr = volume.array
    if arr.dtype.kind in "iub":
        return arr
    if not np.array_equal(arr, np.round(arr)):
        raise InputFileError(volume.path, f"{what} has non-integer values{hint}; an integer label map is expected")
    return arr.astype(np.int32)



def read_instance_scores(path_csv: Path) -> tuple[dict[int, float], bool]:
    """``{lesion_id: score_mean}`` of a lesion table file (:func:`medseg.outputs.lesion_table_file`)
    and whether the scores are an instance model's learned ones (every row's ``score_source``
    is ``learned``)."""
    try:
        table = pd.read_csv(path_csv)
    except (OSError, ValueError) as exc:
        raise InputFileError(path_csv, f"cannot read lesion table: {exc}") from None
    missing = [c for c in ("lesion_id", "score_mean") if c not in table.columns]
    if missing:
        raise InputFileError(
            path_csv, f"lesion table lacks column(s) {missing} (columns: {list(table.columns)})"
        )
    if table["score_mean"].isna().any():
        raise InputFileError(path_csv, "lesion table has empty score_mean values")
    learned = "score_source" in table.columns and len(table) > 0 and bool((table["score_source"] == "learned").all())
    return {int(i): float(s) for i, s in zip(table["lesion_id"], table["score_mean"], strict=True)}, learned

def read_score_source(files: PredictionFiles, ref: Volume, case_id: str) -> ScoreSource:
    """Read the optional score files of one case, checking they lie on the reference grid."""
    if files.lesions is not None and files.lesions_csv is not None:
        volume = read_volume(files.lesions)
        check_same_grid(ref, volume, f"case {case_id}: lesion instances vs reference")
        instances = integer_array(volume, "lesion instance map")
        if instances.size and int(instances.min()) < 0:
            raise InputFileError(files.lesions, "lesion instance map has negative values; 0 = background")
        scores, learned = read_instance_scores(files.lesions_csv)
        kind = "learned" if learned else "lesions_csv"
        return ScoreSource(kind, instances=instances, instance_scores=scores, path=files.lesions_csv)
    if files.prob is not None:
        volume = read_volume(files.prob)
        check_same_grid(ref, volume, f"case {case_id}: probability vs reference")
        return ScoreSource("probability", prob=volume.array, path=files.prob)
    return ScoreSource()



def read_case(case: Case, pred_dir: Path) -> CaseArrays:
    """Read one case's reference label and prediction files (each checked on the reference grid)."""
    if case.label is None:
        raise ValueError(f"case {case.case_id} has no label to evaluate against")
    if not case.label.exists():  # a manifest read with check_files=False
        raise InputFileError(case.label, f"{case.where}: column label: reference label file not found")
    files = prediction_files(pred_dir, case.case_id)
    ref = read_volume(case.label)
    raw = integer_array(ref, "reference label")
    pred = read_volume(files.mask)
    check_same_grid(ref, pred, f"case {case.case_id}: prediction vs reference")
    pred_arr = integer_array(pred, "predicted mask", " (a probability map?)")
    if pred_arr.size and int(pred_arr.min()) < 0:
        raise InputFileError(files.mask, "predicted mask has negative values; 0 = background, 1..K = classes")
    scores = read_score_source(files, ref, case.case_id)
    return CaseArrays(case.case_id, raw, pred_arr, ref.affine, ref.spacing, scores, ref.path)
