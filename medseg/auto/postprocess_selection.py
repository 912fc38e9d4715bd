"""Choose the post-processing rule on out-of-fold probabilities (nnU-Net's "determine
postprocessing", over a grid of rules).

Inputs: for every case, its probability map (:func:`medseg.outputs.prob_file`: float32 lesion probability, (I, J, K), on the
grid of the case's label) predicted by a model that never saw the case (the ``cv`` stage), and
the reference label (mapped to 0/1 with ``data.labels``). Candidates: every rule of
``cv.postprocess`` (:class:`medseg.config.PostprocessSearchConfig`) plus the config's own
``inference`` rule, each expressed in :class:`medseg.config.InferenceConfig` keys and applied
exactly as :func:`medseg.inference.postprocess.postprocess` does (threshold -> fill holes ->
lesions under ``min_lesion_mm3`` removed -> lesions under ``min_component_fraction`` x the
largest remaining one removed).

Scoring without rebuilding masks. Removal steps only ever drop whole 3-D components, so per
case and per (threshold, fill_holes) the mask is discretised (and filled) once, its components
labelled once (cc3d, ``inference.connectivity``) and each component's size and overlap with the
reference counted once; a (min size, fraction) rule is then a selection of component ids, and
its Dice is ``2 sum(overlap) / (sum(size) + |reference|)`` over the kept ids. Masks are rebuilt
only for HD95, which is computed for the rules within ``dice_tolerance`` of the best mean Dice
(the :data:`HD95_MAX_CANDIDATES` best of them) and for the current rule, in a second pass over
the files.

Empty masks (the policy of :mod:`medseg.metrics.voxel`): Dice 1 when prediction and reference
are both empty, 0 when one is; HD95 0 when both are empty, undefined when one is. A rule's mean
HD95 is over the cases where it is defined; ``n_hd95_undefined`` counts the others, and when
ranking by HD95 a rule with fewer undefined cases comes first (a rule that deletes a true
lesion must not look better because that case drops out of its mean).

Selection (``PostprocessSearchConfig``): best = the highest mean Dice; among the rules within
``dice_tolerance`` of it, the winner has the fewest undefined HD95, then the lowest mean HD95,
then comes first in grid order. The current rule is kept unless the winner's mean Dice exceeds
it by more than ``min_gain``, or the winner's mean HD95 is lower by more than
``min_hd95_gain_mm`` with no more undefined cases and a mean Dice no lower than the current
one's minus ``dice_tolerance``.

Lesions (``cv.postprocess.objective``): every rule's per-case lesion F1 is counted as :mod:`medseg.evaluation.runner` does (reference lesions = 3-D components at
``evaluation.connectivity``, matched with ``evaluation.matching`` / ``iou_threshold``), from the
same component tables: a rule's predicted lesions are its kept components (relabelled at the
evaluation's connectivity when it differs from ``inference.connectivity``). With objective
``lesion_f1`` or ``both``, only rules whose mean
lesion F1 is within the margin of the best (0 for ``lesion_f1``, ``lesion_f1_margin`` for
``both``) compete on Dice as above; the current rule is replaced when it is not among them.

``inference.largest_component`` is expressed as ``min_component_fraction`` 1.0 (every
component tied with the largest is kept, where MONAI's ``KeepLargestConnectedComponent`` keeps
one of them: the two differ only on exact ties), so ``chosen`` always sets
``largest_component`` False.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError
from tqdm.auto import tqdm

from medseg.atomic import write_csv, write_json
from medseg.auto.postprocess_rules import (  # the rules' maths; re-exported: medseg.auto.postprocess_selection's public names
    Components,
    candidate_rules,
    current_rule,
    decide,
    describe_rule,
    dice_of_counts,
    min_voxels,
    rule_groups,
    rule_key,
)
from medseg.config import Config, InferenceConfig
from medseg.errors import InputFileError, MedsegError
from medseg.geometry import label_components
from medseg.io import Volume, check_same_grid, read_volume
from medseg.labels import read_label
from medseg.manifest import Case
from medseg.metrics.lesion import lesion_counts, match_lesions, overlap_table
from medseg.metrics.voxel import hd95_assd
from medseg.outputs import POSTPROCESS_CANDIDATES, POSTPROCESS_RULE_KEYS, POSTPROCESS_SELECTION, prob_file
from medseg.progress import progress_enabled

__all__ = ["Components", "PER_CASE_CSV", "PostprocessSelection", "candidate_rules", "current_rule", "describe_rule",
           "read_selection", "select_postprocessing", "write_selection"]

PER_CASE_CSV = "postprocess_per_case.csv"
HD95_MAX_CANDIDATES = 10  # rules within the Dice tolerance whose HD95 is computed (cost bound)


@dataclass
class PostprocessSelection:
    """Result of :func:`select_postprocessing`.

    ``table``: one row per candidate (``candidate`` index, ``threshold``, ``min_lesion_mm3``,
    ``component_fraction``, ``fill_holes``, ``mean_dice``, ``mean_hd95_mm`` (NaN where not
    computed or undefined in every case), ``n_hd95_undefined`` (NA where not computed),
    ``mean_lesion_f1``, ``in_grid``, ``is_current``, ``chosen``),
    sorted by mean Dice, best first.
    ``per_case``: ``case_id``, ``candidate``, ``dice``, ``hd95_mm`` (NaN where not computed or
    undefined), ``lesion_f1``. ``chosen`` / ``current``: rules in
    :data:`~medseg.outputs.POSTPROCESS_RULE_KEYS` (InferenceConfig keys).
    ``reason``: one line. ``search``: the search config used; ``connectivity``: of the
    components; ``n_cases``: cases scored.
    """

    table: pd.DataFrame
    per_case: pd.DataFrame
    chosen: dict[str, Any]
    current: dict[str, Any]
    reason: str
    search: dict[str, Any] = field(default_factory=dict)
    connectivity: int = 26
    n_cases: int = 0
    objective: str = "dice"


def _load_case(case: Case, prob_dir: Path, cfg: Config) -> tuple[np.ndarray, Volume]:
    """(C-contiguous float probability (I, J, K), binary label volume); clear errors."""
    if case.label is None:
        raise InputFileError(case.case_id, "case has no label; post-processing is chosen on labelled cases only")
    prob_path = prob_file(prob_dir, case.case_id)
    if not prob_path.is_file():
        raise InputFileError(
            prob_path,
            f"out-of-fold probability of case {case.case_id!r} is missing; run the cv stage "
            "(inference.write_prob) for every case first",
        )
    prob = read_volume(prob_path)
    if not np.issubdtype(prob.array.dtype, np.floating):
        raise InputFileError(prob_path, f"holds {prob.array.dtype} values; a float lesion probability is expected")
    label = read_label(case.label, cfg.data.labels)
    check_same_grid(prob, label, context=f"out-of-fold probability of case {case.case_id}")
    return np.ascontiguousarray(prob.array), label


def select_postprocessing(cases: Sequence[Case], prob_dir: str | Path, cfg: Config, progress: bool = True) -> PostprocessSelection:
    """Score every candidate rule on the out-of-fold probabilities in ``prob_dir`` and choose one
    (module docstring). ``cases``: labelled cases, each with its probability map in
    ``prob_dir`` on its label's grid. Raises ``InputFileError`` / ``GeometryMismatchError``
    naming the file for a missing, unreadable or misaligned probability."""
    cases = list(cases)
    if not cases:
        raise MedsegError("post-processing selection needs at least one labelled case with an out-of-fold probability")
    search = cfg.cv.postprocess
    connectivity = cfg.inference.connectivity
    prob_dir = Path(prob_dir)
    rules = candidate_rules(search)
    n_grid = len(rules)
    current = current_rule(cfg.inference)
    keys = [rule_key(r) for r in rules]
    if rule_key(current) in keys:
        current_idx = keys.index(rule_key(current))
    else:
        rules.append(current)
        current_idx = len(rules) - 1
    groups = rule_groups(rules)
    lesions = search.objective != "dice"  # lesion F1 takes part in the choice (always scored and shown)
    ev = cfg.evaluation
    relabel = ev.connectivity != connectivity  # predicted lesions differ from the components

    # pass 1: Dice (and lesion F1) of every rule from component sizes and overlaps
    dice = np.zeros((len(cases), len(rules)))
    f1 = np.zeros((len(cases), len(rules)))
    for c, case in enumerate(tqdm(cases, desc="postprocess: Dice", unit="case", disable=not progress_enabled(progress))):
        prob, label = _load_case(case, prob_dir, cfg)
        voxel_mm3 = float(np.prod(label.spacing))
        n_ref = int(np.count_nonzero(label.array))
        ref_lesions, n_ref_lesions = label_components(label.array, ev.connectivity)
        ref_sizes = np.bincount(ref_lesions.ravel(), minlength=n_ref_lesions + 1)[1:].astype(np.int64)
        for (threshold, fill), members in groups.items():
            comps = Components(prob, label.array, threshold, fill, connectivity, keep_labels=relabel,
                               ref_lesions=None if relabel else ref_lesions)
            for i in members:
                keep = comps.kept(min_voxels(rules[i]["min_lesion_mm3"], voxel_mm3), rules[i]["min_component_fraction"])
                dice[c, i] = dice_of_counts(int(comps.overlap[keep].sum()), int(comps.sizes[keep].sum()), n_ref)
                if relabel:
                    pred, n_pred = label_components(comps.mask(keep), ev.connectivity)
                    table = overlap_table(ref_lesions, pred, n_ref_lesions, n_pred)
                else:
                    table = comps.lesion_table(keep, ref_sizes)
                f1[c, i] = lesion_counts(match_lesions(table, ev.matching, ev.iou_threshold)).f1
    mean_dice = dice.mean(axis=0)
    mean_f1 = f1.mean(axis=0)

    # the rules that compete on Dice: all, or those within the margin of the best lesion F1
    if lesions:
        margin = 0.0 if search.objective == "lesion_f1" else search.lesion_f1_margin
        competing = [i for i in range(len(rules)) if mean_f1[i] >= mean_f1.max() - margin - 1e-12]
    else:
        competing = list(range(len(rules)))

    # pass 2: HD95 of the competing rules near the best Dice and of the current rule
    order = sorted(range(len(rules)), key=lambda i: (-mean_dice[i], i))
    best = max(mean_dice[i] for i in competing)
    competing_set = set(competing)
    within = [i for i in order if i in competing_set and mean_dice[i] >= best - search.dice_tolerance - 1e-12]
    hd95_set = sorted(set(within[:HD95_MAX_CANDIDATES]) | {current_idx})
    hd95 = np.full((len(cases), len(rules)), np.nan)
    undefined = np.zeros(len(rules), dtype=np.int64)
    hd_groups = rule_groups([rules[i] for i in hd95_set])
    for c, case in enumerate(tqdm(cases, desc="postprocess: HD95", unit="case", disable=not progress_enabled(progress))):
        prob, label = _load_case(case, prob_dir, cfg)
        voxel_mm3 = float(np.prod(label.spacing))
        ref = label.array.astype(bool)
        ref_empty = not ref.any()
        for (threshold, fill), members in hd_groups.items():
            comps = Components(prob, None, threshold, fill, connectivity, keep_labels=True)
            for i in (hd95_set[m] for m in members):
                keep = comps.kept(min_voxels(rules[i]["min_lesion_mm3"], voxel_mm3), rules[i]["min_component_fraction"])
                pred_empty = not keep.any()
                if pred_empty and ref_empty:
                    hd95[c, i] = 0.0
                elif pred_empty or ref_empty:
                    undefined[i] += 1
                else:
                    hd95[c, i] = hd95_assd(comps.mask(keep), ref, label.spacing)[0]
    mean_hd95 = np.full(len(rules), np.nan)
    for i in hd95_set:
        defined = hd95[:, i][np.isfinite(hd95[:, i])]
        mean_hd95[i] = float(defined.mean()) if defined.size else np.nan

    # choose
    within_set = set(within)
    eligible = [i for i in hd95_set if i in within_set]
    winner = min(eligible, key=lambda i: (undefined[i], np.inf if np.isnan(mean_hd95[i]) else mean_hd95[i], i))
    if lesions and current_idx not in competing_set:
        chosen_idx = winner
        reason = (f"{describe_rule(rules[winner])}: mean lesion F1 {mean_f1[winner]:.3f}, Dice {mean_dice[winner]:.3f}; "
                  f"the current rule {describe_rule(rules[current_idx])} has lesion F1 {mean_f1[current_idx]:.3f} "
                  f"(Dice {mean_dice[current_idx]:.3f}), more than {margin:g} below the best {mean_f1.max():.3f} "
                  f"(objective {search.objective})")
    else:
        chosen_idx, reason = decide(winner, current_idx, rules, mean_dice, mean_hd95, undefined, search)
        if lesions:
            reason += (f"; among the rules within {margin:g} of the best mean lesion F1 {mean_f1.max():.3f} "
                       f"(objective {search.objective}; chosen {mean_f1[chosen_idx]:.3f})")

    table = pd.DataFrame({
        "candidate": np.arange(len(rules)),
        "threshold": [r["threshold"] for r in rules],
        "min_lesion_mm3": [r["min_lesion_mm3"] for r in rules],
        "component_fraction": [r["min_component_fraction"] for r in rules],
        "fill_holes": [r["fill_holes"] for r in rules],
        "mean_dice": mean_dice,
        "mean_hd95_mm": mean_hd95,
        "n_hd95_undefined": pd.array([int(undefined[i]) if i in hd95_set else None for i in range(len(rules))], dtype="Int64"),
        "mean_lesion_f1": mean_f1,
        "in_grid": np.arange(len(rules)) < n_grid,
        "is_current": np.arange(len(rules)) == current_idx,
        "chosen": np.arange(len(rules)) == chosen_idx,
    })
    table = table.iloc[order].reset_index(drop=True)
    per_case = pd.DataFrame({
        "case_id": np.repeat([case.case_id for case in cases], len(rules)),
        "candidate": np.tile(np.arange(len(rules)), len(cases)),
        "dice": dice.ravel(),
        "hd95_mm": hd95.ravel(),
        "lesion_f1": f1.ravel(),
    })
    return PostprocessSelection(
        table=table,
        per_case=per_case,
        chosen=dict(rules[chosen_idx]),
        current=dict(current),
        reason=reason,
        search=search.model_dump(mode="json"),
        connectivity=connectivity,
        n_cases=len(cases),
        objective=search.objective,
    )


def write_selection(selection: PostprocessSelection, out_dir: str | Path) -> dict[str, Path]:
    """Write ``postprocess.json`` (chosen, current, reason, search, connectivity, n_cases),
    ``postprocess_candidates.csv`` (``table``) and ``postprocess_per_case.csv`` atomically.
    Returns ``{"selection": ..., "candidates": ..., "per_case": ...}``."""
    out = Path(out_dir)
    summary = {
        "chosen": selection.chosen,
        "current": selection.current,
        "reason": selection.reason,
        "search": selection.search,
        "connectivity": selection.connectivity,
        "n_cases": selection.n_cases,
        "objective": selection.objective,
    }
    return {
        "selection": write_json(out / POSTPROCESS_SELECTION, summary),
        "candidates": write_csv(out / POSTPROCESS_CANDIDATES, selection.table),
        "per_case": write_csv(out / PER_CASE_CSV, selection.per_case),
    }


def read_selection(path: str | Path) -> dict[str, Any]:
    """The ``chosen`` rule of a ``postprocess.json`` (a file, or the folder holding it), checked
    against :class:`InferenceConfig`: a dict of :data:`~medseg.outputs.POSTPROCESS_RULE_KEYS` to set
    on ``inference``.
    Raises ``MedsegError`` naming the file when it is missing, not JSON or the rule is invalid."""
    p = Path(path)
    if p.is_dir():
        p = p / POSTPROCESS_SELECTION
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MedsegError(f"{p}: post-processing selection not found; run the postprocess stage first") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedsegError(f"{p}: not a readable post-processing selection ({exc})") from exc
    chosen = data.get("chosen") if isinstance(data, dict) else None
    if not isinstance(chosen, dict):
        raise MedsegError(f"{p}: has no 'chosen' rule object")
    missing = [k for k in POSTPROCESS_RULE_KEYS if k not in chosen]
    extra = sorted(set(chosen) - set(POSTPROCESS_RULE_KEYS))
    if missing or extra:
        raise MedsegError(f"{p}: 'chosen' must have exactly the keys {list(POSTPROCESS_RULE_KEYS)} (missing {missing}, unexpected {extra})")
    try:
        checked = InferenceConfig.model_validate(chosen)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise MedsegError(f"{p}: invalid post-processing rule in 'chosen': {problems}") from exc
    return {k: getattr(checked, k) for k in POSTPROCESS_RULE_KEYS}
