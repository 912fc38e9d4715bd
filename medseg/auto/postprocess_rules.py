"""The post-processing rules as pure computation: the candidate grid, a rule's description, the
3-D components of one case's mask with their sizes and overlaps (a rule is a selection of
component ids), and the decision between the grid's winner and the current rule.

Arrays in, numbers out; no file is read here. :mod:`medseg.auto.postprocess_selection` loads the
out-of-fold probabilities, scores every rule with these pieces and writes the choice (its module
docstring states the scoring, the empty-mask policy and the selection rules).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from medseg.config import InferenceConfig, PostprocessSearchConfig
from medseg.geometry import bounding_box, label_foreground
from medseg.inference.postprocess import HOPS, discretise
from medseg.metrics.lesion import OverlapTable


def _rule(threshold: float, min_mm3: float, fraction: float, fill: bool) -> dict[str, Any]:
    return {
        "threshold": float(threshold),
        "min_lesion_mm3": float(min_mm3),
        "min_component_fraction": float(fraction),
        "fill_holes": bool(fill),
        "largest_component": False,
    }


def rule_key(rule: dict[str, Any]) -> tuple[float, float, float, bool]:
    return (rule["threshold"], rule["min_lesion_mm3"], rule["min_component_fraction"], rule["fill_holes"])


def candidate_rules(search: PostprocessSearchConfig) -> list[dict[str, Any]]:
    """The grid ``thresholds x min_lesion_mm3 x component_fractions x fill_holes`` (in that
    nesting order, ``fill_holes`` innermost; repeated values dropped), as InferenceConfig keys
    (:data:`~medseg.outputs.POSTPROCESS_RULE_KEYS`, ``largest_component`` always False)."""
    rules: dict[tuple[float, float, float, bool], dict[str, Any]] = {}
    for t, m, f, h in itertools.product(search.thresholds, search.min_lesion_mm3, search.component_fractions, search.fill_holes):
        rule = _rule(t, m, f, h)
        rules.setdefault(rule_key(rule), rule)
    return list(rules.values())


def current_rule(inference: InferenceConfig) -> dict[str, Any]:
    """The config's own rule in :data:`~medseg.outputs.POSTPROCESS_RULE_KEYS`; ``largest_component`` -> fraction 1.0."""
    fraction = 1.0 if inference.largest_component else inference.min_component_fraction
    return _rule(inference.threshold, inference.min_lesion_mm3, fraction, inference.fill_holes)


def describe_rule(rule: dict[str, Any]) -> str:
    """``threshold 0.4 + fill holes + lesions >= 10 mm3 + components >= 0.1 x largest``."""
    parts = [f"threshold {rule['threshold']:g}"]
    if rule["fill_holes"]:
        parts.append("fill holes")
    if rule["min_lesion_mm3"] > 0:
        parts.append(f"lesions >= {rule['min_lesion_mm3']:g} mm3")
    fraction = 1.0 if rule.get("largest_component") else rule["min_component_fraction"]
    if fraction >= 1.0:
        parts.append("largest component only")
    elif fraction > 0:
        parts.append(f"components >= {fraction:g} x largest")
    return " + ".join(parts)


def min_voxels(min_mm3: float, voxel_mm3: float) -> int:
    """Voxel count under which ``remove_small_lesions`` drops a lesion (0: keeps every one)."""
    if min_mm3 <= 0:
        return 0
    return math.ceil(min_mm3 / voxel_mm3 - 1e-9)  # the same rounding as remove_small_lesions


class Components:
    """The 3-D components of one case's mask at one (threshold, fill_holes), and each one's
    size and overlap with the reference.

    ``prob``: (I, J, K) probability; ``ref``: (I, J, K) 0/1 reference (or None). Index 0 of
    ``sizes`` / ``overlap`` is the background (count 0); component ids are 1..n.
    ``keep_labels``: keep the labelled box so that :meth:`mask` can rebuild a rule's mask.
    ``ref_lesions``: the reference's lesion label map (I, J, K) (ids 1..n); when given, every
    (component, reference lesion) pair sharing voxels is counted once (``pair_comp``,
    ``pair_ref``, ``pair_inter``) for :meth:`lesion_table`.
    """

    def __init__(self, prob: np.ndarray, ref: np.ndarray | None, threshold: float, fill_holes: bool,
                 connectivity: int, keep_labels: bool = False, ref_lesions: np.ndarray | None = None) -> None:
        self.shape = prob.shape
        mask = discretise(prob, threshold)
        self.box = bounding_box(mask)
        self.labels: np.ndarray | None = None
        empty = np.zeros(0, dtype=np.int64)
        self.pair_comp, self.pair_ref, self.pair_inter = empty, empty, empty
        if self.box is None:
            self.sizes = np.zeros(1, dtype=np.int64)
            self.overlap = np.zeros(1, dtype=np.int64)
            return
        crop = mask[self.box]
        if fill_holes:
            crop = _fill_holes_crop(crop, connectivity)
        foreground = np.ascontiguousarray(crop, dtype=bool)
        labels, n = label_foreground(foreground, connectivity)
        where = np.flatnonzero(foreground)
        ids = labels.ravel()[where]
        self.sizes = np.bincount(ids, minlength=n + 1).astype(np.int64, copy=False)
        if ref is not None:
            hit = np.ascontiguousarray(ref[self.box]).ravel()[where] > 0
            self.overlap = np.bincount(ids[hit], minlength=n + 1).astype(np.int64, copy=False)
        else:
            self.overlap = np.zeros(n + 1, dtype=np.int64)
        if ref_lesions is not None:
            ref_ids = np.ascontiguousarray(ref_lesions[self.box]).ravel()[where].astype(np.int64)
            hit = ref_ids > 0
            n_ref = int(ref_ids.max(initial=0))
            codes, inter = np.unique(ids[hit].astype(np.int64) * (n_ref + 1) + ref_ids[hit], return_counts=True)
            self.pair_comp, self.pair_ref, self.pair_inter = codes // (n_ref + 1), codes % (n_ref + 1), inter.astype(np.int64)
        if keep_labels:
            self.labels = labels

    def kept(self, min_voxels: int, fraction: float) -> np.ndarray:
        """Boolean over component ids (0 = background, always False): the components a rule
        keeps. As postprocess: lesions under ``min_voxels`` go first, then those under
        ``fraction`` x the largest remaining one (``remove_minor_components``' comparison)."""
        keep = self.sizes >= max(min_voxels, 1)  # min_voxels <= 1 removes nothing; drops id 0
        if fraction > 0 and np.count_nonzero(keep) > 1:
            keep &= ~(self.sizes < fraction * self.sizes[keep].max())
        return keep

    def lesion_table(self, keep: np.ndarray, ref_sizes: np.ndarray) -> OverlapTable:
        """The :class:`OverlapTable` of the reference lesions (sizes ``ref_sizes``, (n_ref,))
        against the kept components, renumbered 1..n_kept in id order (needs ``ref_lesions``)."""
        new_id = np.cumsum(keep)  # kept component id -> 1..n_kept
        pairs = keep[self.pair_comp]
        return OverlapTable(
            ref_sizes=ref_sizes,
            pred_sizes=self.sizes[keep],
            pair_ref=self.pair_ref[pairs],
            pair_pred=new_id[self.pair_comp[pairs]],
            pair_inter=self.pair_inter[pairs],
        )

    def mask(self, keep: np.ndarray) -> np.ndarray:
        """Boolean (I, J, K) mask of the kept components (needs ``keep_labels``)."""
        out = np.zeros(self.shape, dtype=bool)
        if self.box is not None:
            assert self.labels is not None, "Components(keep_labels=True) is needed to rebuild masks"
            out[self.box] = keep[self.labels]
        return out


def _fill_holes_crop(crop: np.ndarray, connectivity: int) -> np.ndarray:
    """MONAI ``FillHoles`` (the call postprocess makes) on the mask's bounding box padded by one
    voxel: every background voxel outside the box reaches the array border in a straight line,
    so the one-voxel shell stands for all of it and the filled voxels are those of a fill over
    the whole volume (tests compare with postprocess), at the cost of the box only."""
    from monai.transforms import FillHoles

    padded = np.pad(crop, 1)
    filled = np.asarray(FillHoles(connectivity=HOPS[connectivity])(padded[None]))[0]
    return filled[1:-1, 1:-1, 1:-1]


def dice_of_counts(tp: int, n_pred: int, n_ref: int) -> float:
    """Dice with medseg's empty policy: 1 when both are empty, 0 when one is."""
    den = n_pred + n_ref
    return 2.0 * tp / den if den > 0 else 1.0


def rule_groups(rules: list[dict[str, Any]]) -> dict[tuple[float, bool], list[int]]:
    """Candidate indices by (threshold, fill_holes): one component labelling per group."""
    groups: dict[tuple[float, bool], list[int]] = {}
    for i, rule in enumerate(rules):
        groups.setdefault((rule["threshold"], rule["fill_holes"]), []).append(i)
    return groups


def _fmt_hd(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.1f}"


def decide(winner: int, current: int, rules: list[dict[str, Any]], mean_dice: np.ndarray, mean_hd95: np.ndarray,
            undefined: np.ndarray, search: PostprocessSearchConfig) -> tuple[int, str]:
    """(chosen candidate index, one-line reason): the winner or the current rule (the selection rules of
    :mod:`medseg.auto.postprocess_selection`'s docstring)."""
    d_w, d_c = float(mean_dice[winner]), float(mean_dice[current])
    h_w, h_c = float(mean_hd95[winner]), float(mean_hd95[current])
    hd = f"HD95 {_fmt_hd(h_w)} vs {_fmt_hd(h_c)} mm"
    if undefined[winner] or undefined[current]:
        hd += f" (undefined in {undefined[winner]} vs {undefined[current]} cases)"
    if winner == current:
        return current, (f"current rule {describe_rule(rules[current])} is the best candidate: "
                         f"mean Dice {d_c:.3f}, HD95 {_fmt_hd(h_c)} mm")
    dice_gain = d_w - d_c
    hd_gain = h_c - h_w if np.isfinite(h_c) and np.isfinite(h_w) else float("nan")
    hd_better = (
        bool(hd_gain > search.min_hd95_gain_mm)
        and undefined[winner] <= undefined[current]
        and d_w >= d_c - search.dice_tolerance
    )
    head = f"{describe_rule(rules[winner])}: mean Dice {d_w:.3f} vs {d_c:.3f} ({dice_gain:+.3f}) and {hd}"
    if dice_gain > search.min_gain:
        return winner, head
    if hd_better:
        return winner, f"{head}: HD95 better by {hd_gain:.1f} mm > {search.min_hd95_gain_mm:g} mm"
    return current, (
        f"kept current rule {describe_rule(rules[current])}: best candidate {describe_rule(rules[winner])} "
        f"gains mean Dice {dice_gain:+.3f} (needs > {search.min_gain:g}) and {hd} "
        f"(needs > {search.min_hd95_gain_mm:g} mm lower)"
    )
