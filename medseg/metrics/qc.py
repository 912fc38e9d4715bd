"""The model's own doubt about a case, and whether it says anything about accuracy.

A radiologist has time to look at a few results of a batch, not all. The score here is computed
from a case's lesion probability map alone, so it exists both out-of-fold (a fold model's
probabilities of its held-out patients) and at inference (the fold ensemble's averaged
probabilities):

``uncertain_fraction`` = sum over voxels of the binary entropy H(p) (bits, 0..1) divided by the
soft predicted lesion volume sum(p): how much of what the model calls lesion it is unsure of.
Thick uncertain borders around a small lesion, or many faint candidates, score high; a crisp
lesion scores low; a case with no predicted lesion at all scores by its uncertain voxels alone
(divided by one voxel's worth), so faint doubt somewhere still counts.

:func:`calibrate` measures on the cross-validation predictions how well the score ranks the
out-of-fold Dice (Spearman correlation with a patient-bootstrap 95 % interval; the share of the
worst-Dice decile caught by flagging the top-score decile) and picks the flag threshold there.
A relation counts as useful only when the interval of the correlation lies below zero (higher
doubt, lower Dice); otherwise nothing is flagged and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

SCORE_NAME = "uncertain_fraction"
SCORE_DEFINITION = ("sum of the voxels' binary entropy H(p) (bits) over the soft predicted lesion volume sum(p): "
                    "the share of the predicted lesion the model is unsure of")
FLAG_SHARE = 0.10  # the top decile of the out-of-fold scores sets the threshold
N_RESAMPLES = 2_000
MIN_CASES = 5


CHUNK_VOXELS = 1 << 22  # voxels per block: a 512 x 512 x 200 CT map is scored in 4 M-voxel pieces


def uncertain_fraction(prob: np.ndarray) -> float:
    """The QC score of one case (module docstring) from its lesion probability map (any shape,
    values in [0, 1]). Higher = more doubt. Computed in float32 blocks of :data:`CHUNK_VOXELS`
    (sums in float64), so a whole-CT map costs tens of MB beside itself, not several copies."""
    flat = np.asarray(prob).reshape(-1)
    entropy_sum = mass = 0.0
    for start in range(0, flat.size, CHUNK_VOXELS):
        p = np.clip(flat[start:start + CHUNK_VOXELS].astype(np.float32, copy=False), 0.0, 1.0)
        q = 1.0 - p
        entropy = p * np.log2(p, where=p > 0, out=np.zeros_like(p))
        entropy += q * np.log2(q, where=q > 0, out=np.zeros_like(q))
        entropy_sum -= float(entropy.sum(dtype=np.float64))
        mass += float(p.sum(dtype=np.float64))
    return float(entropy_sum / max(mass, 1.0))


def _spearman(scores: np.ndarray, dice: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.unique(scores).size < 2 or np.unique(dice).size < 2:
        return float("nan")
    return float(spearmanr(scores, dice).statistic)


def _bootstrap_spearman(scores: np.ndarray, dice: np.ndarray, patients: np.ndarray, seed: int = 0) -> list[float] | None:
    """95 % percentile interval of Spearman's rho, resampling patients (their cases together)."""
    unique, index = np.unique(patients, return_inverse=True)
    if unique.size < 3:
        return None
    members = [np.flatnonzero(index == i) for i in range(unique.size)]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(N_RESAMPLES):
        rows = np.concatenate([members[i] for i in rng.integers(0, unique.size, unique.size)])
        rho = _spearman(scores[rows], dice[rows])
        if not math.isnan(rho):
            values.append(rho)
    if len(values) < N_RESAMPLES // 2:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def calibrate(scores: Sequence[float], dice: Sequence[float], patients: Sequence[str],
              flag_share: float = FLAG_SHARE) -> dict[str, Any]:
    """How well ``scores`` (one per case) rank the cases' out-of-fold ``dice`` (module docstring).

    Returns the record written to the model folder: ``spearman`` and its ``ci95``, the
    ``threshold`` (the score above which the top ``flag_share`` of cases lie), the share of the
    worst-Dice ``flag_share`` of cases the flag catches, and ``useful``.
    """
    s = np.asarray(scores, dtype=np.float64)
    d = np.asarray(dice, dtype=np.float64)
    ids = np.asarray(patients, dtype=str)
    keep = np.isfinite(s) & np.isfinite(d)
    s, d, ids = s[keep], d[keep], ids[keep]
    record: dict[str, Any] = {"score": SCORE_NAME, "definition": SCORE_DEFINITION, "n_cases": int(s.size),
                              "n_patients": int(np.unique(ids).size), "flag_share": flag_share,
                              "spearman": None, "ci95": None, "threshold": None, "worst_caught": None,
                              "useful": False}
    if s.size < MIN_CASES:
        record["why"] = f"{s.size} case(s) with a score and a Dice; at least {MIN_CASES} are needed"
        return record
    rho = _spearman(s, d)
    ci = _bootstrap_spearman(s, d, ids)
    n_flag = max(1, math.ceil(flag_share * s.size))
    threshold = float(np.sort(s)[-n_flag])
    flagged = s >= threshold
    worst = np.argsort(d, kind="stable")[:n_flag]
    record.update({
        "spearman": None if math.isnan(rho) else round(rho, 4),
        "ci95": None if ci is None else [round(v, 4) for v in ci],
        "threshold": threshold,
        "worst_caught": round(float(flagged[worst].mean()), 4),
        "useful": bool(ci is not None and ci[1] < 0.0),
    })
    record["why"] = ("the interval of the rank correlation lies below zero: higher doubt, lower Dice" if record["useful"]
                     else "the interval of the rank correlation includes zero: the score does not rank the accuracy "
                          "reliably on these patients, so no case is flagged")
    return record
