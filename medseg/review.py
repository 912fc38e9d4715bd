"""The review list: which predicted cases a radiologist should look at first.

The QC score (:func:`medseg.metrics.qc.uncertain_fraction`, the model's doubt about a case) is
calibrated on the cross-validation: :func:`calibrate_on_cv` scores every out-of-fold
probability map and measures how well the score ranks the out-of-fold Dice of the rule the model
folder ships; the record (``qc.json``, :data:`medseg.outputs.QC_RECORD`) goes into the model
folder. At inference (:func:`qc_columns`) each case gets ``qc_score`` and, when the calibration
found a useful relation, ``qc_flag`` (score at or above the threshold); the report lists the
flagged cases under "Review first", or says that the cross-validation showed no useful relation.

Out-of-fold, one fold model (or its repeats) predicts a patient; at inference the fold ensemble
does, whose averaged probabilities are less crisp where the folds disagree, so the same case
scores somewhat higher there: the threshold errs towards flagging more, not fewer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medseg.manifest import Case
from medseg.metrics.qc import calibrate, uncertain_fraction
from medseg.outputs import prob_file

log = logging.getLogger(__name__)


def calibrate_on_cv(cases: Sequence[Case], oof_dir: Path, cv_table: Path) -> dict[str, Any]:
    """Score every case of ``cases`` with an out-of-fold probability map in ``oof_dir`` and
    calibrate the score on the Dice column of ``cv_table`` (a ``cv_table.csv``: case_id,
    patient_id, dice). Returns the :func:`medseg.metrics.qc.calibrate` record plus the per-case
    scores."""
    from medseg.io import read_volume

    table = pd.read_csv(cv_table, dtype={"case_id": str, "patient_id": str})
    table = table[table["case_id"] != "mean"].set_index("case_id")
    rows = []
    for case in cases:
        path = prob_file(oof_dir, case.case_id)
        if case.case_id not in table.index or not path.is_file():
            continue
        score = uncertain_fraction(read_volume(path).array)
        rows.append((case.case_id, str(table.loc[case.case_id, "patient_id"]), score,
                     float(table.loc[case.case_id, "dice"])))
    record = calibrate([r[2] for r in rows], [r[3] for r in rows], [r[1] for r in rows])
    record["cases"] = [{"case_id": c, "qc_score": round(s, 6), "dice": round(d, 6)} for c, _, s, d in rows]
    log.info("qc: Spearman %s (95 %% CI %s) of the QC score with out-of-fold Dice over %d case(s); %s",
             record["spearman"], record["ci95"], record["n_cases"], "flagging" if record["useful"] else "no flags")
    return record


def read_qc(model_dir: Path | None) -> dict[str, Any] | None:
    """The model folder's QC record, or None (no folder, an older folder, unreadable)."""
    from medseg.outputs import QC_RECORD

    if model_dir is None:
        return None
    try:
        record = json.loads((Path(model_dir) / QC_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def qc_columns(prob: np.ndarray, record: dict[str, Any] | None) -> dict[str, Any]:
    """One case's ``qc_score`` (always) and ``qc_flag`` (True/False when ``record`` found a useful
    relation on the cross-validation, else None) from its lesion probability map."""
    score = uncertain_fraction(prob)
    flag = None
    if record and record.get("useful") and record.get("threshold") is not None:
        flag = bool(score >= float(record["threshold"]))
    return {"qc_score": round(score, 6), "qc_flag": flag}
