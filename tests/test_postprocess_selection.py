"""Post-processing selection on out-of-fold probabilities: exact scores, the selection rule, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_affine, write_nifti

from medseg.auto.postprocess_selection import (
    Components,
    candidate_rules,
    read_selection,
    select_postprocessing,
    write_selection,
)
from medseg.config import Config, InferenceConfig, PostprocessSearchConfig
from medseg.errors import GeometryMismatchError, InputFileError, MedsegError
from medseg.inference.postprocess import postprocess
from medseg.manifest import Case
from medseg.metrics.voxel import hd95_assd
from medseg.outputs import POSTPROCESS_RULE_KEYS

SPACING = (0.8, 0.8, 2.5)  # voxel 1.6 mm3
AFFINE = make_affine("oblique", spacing=SPACING)
SHAPE = (64, 56, 20)


def _ball(center: tuple[int, int, int], radius_mm: float, shape=SHAPE) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    dist2 = sum(((grid[a] - center[a]) * SPACING[a]) ** 2 for a in range(3))
    return dist2 <= radius_mm**2


def _write_case(tmp: Path, case_id: str, prob: np.ndarray, label: np.ndarray, prob_affine=AFFINE) -> Case:
    write_nifti(tmp / f"{case_id}_prob.nii.gz", prob.astype(np.float32), prob_affine)
    label_path = write_nifti(tmp / f"{case_id}_seg.nii.gz", label.astype(np.uint8), AFFINE)
    return Case(case_id, case_id, "MR", {}, label_path, "train")


def _blobs_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Blobs of several sizes and probabilities, one with a hole, touching blobs, noise."""
    prob = rng.random(SHAPE) * 0.35  # background noise up to 0.35: specks at threshold 0.3
    big = _ball((20, 20, 10), 9.0)
    prob[big] = 0.85
    prob[_ball((20, 20, 10), 2.0)] = 0.2  # an enclosed hole in the big lesion
    prob[_ball((48, 40, 8), 5.0)] = 0.65
    prob[_ball((50, 12, 14), 3.0)] = 0.45
    prob[_ball((8, 48, 4), 2.5)] = 0.75
    prob[40:42, 30:31, 15:16] = 0.95  # a 2-voxel lesion (3.2 mm3)
    label = _ball((20, 20, 10), 9.0) | _ball((48, 40, 8), 4.0)
    return prob, label


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    den = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / den if den else 1.0


def _search(**kw) -> Config:
    cfg = Config()
    for key, value in kw.items():
        setattr(cfg.cv.postprocess, key, value)
    return cfg


def test_candidate_rules_grid():
    search = PostprocessSearchConfig()
    rules = candidate_rules(search)
    assert len(rules) == 5 * 5 * 4 * 2
    assert all(tuple(r) == POSTPROCESS_RULE_KEYS for r in rules)
    assert all(r["largest_component"] is False for r in rules)
    assert rules[0] == {"threshold": 0.3, "min_lesion_mm3": 0.0, "min_component_fraction": 0.0,
                        "fill_holes": False, "largest_component": False}
    assert rules[1]["fill_holes"] is True and rules[2]["min_component_fraction"] == 0.1
    for r in rules[:5]:
        InferenceConfig(**r)
    small = PostprocessSearchConfig(thresholds=[0.5, 0.5], min_lesion_mm3=[0.0], component_fractions=[0.0, 1.0], fill_holes=[False])
    assert [r["min_component_fraction"] for r in candidate_rules(small)] == [0.0, 1.0]


def test_component_masks_equal_postprocess(tmp_path, rng):
    prob, label = _blobs_case(rng)
    voxel_mm3 = float(np.prod(SPACING))
    search = PostprocessSearchConfig(min_lesion_mm3=[0.0, 3.0, 10.0, 100.0, 500.0], component_fractions=[0.0, 0.05, 0.3, 1.0])
    rules = candidate_rules(search)
    checked_fill = 0
    for connectivity in (26, 6):
        for rule in rules[:: 3 if connectivity == 26 else 7]:
            comps = Components(prob, label, rule["threshold"], rule["fill_holes"], connectivity, keep_labels=True)
            min_voxels = int(np.ceil(rule["min_lesion_mm3"] / voxel_mm3 - 1e-9)) if rule["min_lesion_mm3"] > 0 else 0
            keep = comps.kept(min_voxels, rule["min_component_fraction"])
            expected = postprocess(prob, SPACING, InferenceConfig(**rule, connectivity=connectivity)).astype(bool)
            np.testing.assert_array_equal(comps.mask(keep), expected)
            tp, n_pred = int(comps.overlap[keep].sum()), int(comps.sizes[keep].sum())
            assert 2.0 * tp / (n_pred + label.sum()) == pytest.approx(_dice(expected, label), abs=1e-12)
            checked_fill += rule["fill_holes"] and not np.array_equal(
                expected, postprocess(prob, SPACING, InferenceConfig(**{**rule, "fill_holes": False}, connectivity=connectivity)))
    assert checked_fill > 0  # the hole was filled in some sampled rules: FillHoles is exercised


def test_selection_scores_match_postprocess_on_files(tmp_path, rng):
    cases = []
    arrays = {}
    for k in range(2):
        prob, label = _blobs_case(rng)
        if k == 1:
            label[:] = False  # an empty reference: Dice 0 unless every lesion is removed
        cases.append(_write_case(tmp_path, f"c{k}", prob, label))
        arrays[f"c{k}"] = (prob.astype(np.float32), label)
    cfg = Config()
    cfg.inference.threshold = 0.45  # current rule outside the grid
    sel = select_postprocessing(cases, tmp_path, cfg, progress=False)
    n_grid = 200
    assert len(sel.table) == n_grid + 1
    current = sel.table[sel.table.is_current]
    assert len(current) == 1 and current.threshold.item() == 0.45 and not current.in_grid.item()
    assert current.candidate.item() == n_grid
    assert list(sel.table.mean_dice) == sorted(sel.table.mean_dice, reverse=True)
    assert sel.table.chosen.sum() == 1
    rules = sel.table.set_index("candidate").sort_index()
    for cand in [*range(0, n_grid, 13), n_grid]:
        row = rules.loc[cand]
        rule = {"threshold": row.threshold, "min_lesion_mm3": row.min_lesion_mm3,
                "min_component_fraction": row.component_fraction, "fill_holes": bool(row.fill_holes)}
        for case_id, (prob, label) in arrays.items():
            expected = postprocess(prob, SPACING, InferenceConfig(**rule)).astype(bool)
            got = sel.per_case[(sel.per_case.case_id == case_id) & (sel.per_case.candidate == cand)]
            assert got.dice.item() == pytest.approx(_dice(expected, label), abs=1e-12)
    # HD95 where computed equals the metric on postprocess's own mask (the reference of c1 is
    # empty: HD95 0 when the mask is empty too, else undefined)
    hd_rows = sel.per_case[sel.per_case.hd95_mm.notna() & (sel.per_case.case_id == "c0")]
    assert len(hd_rows) > 0
    for row in hd_rows.itertuples():
        r = rules.loc[row.candidate]
        mask = postprocess(arrays["c0"][0], SPACING, InferenceConfig(
            threshold=r.threshold, min_lesion_mm3=r.min_lesion_mm3, min_component_fraction=r.component_fraction,
            fill_holes=bool(r.fill_holes))).astype(bool)
        assert row.hd95_mm == pytest.approx(hd95_assd(mask, arrays["c0"][1], SPACING)[0])


def _fp_cases(tmp: Path, fp_voxels: int, fp_prob: float) -> list[Case]:
    """3 cases: a true lesion (prob 0.9, ~900 voxels, = label) and a far false positive."""
    cases = []
    for k in range(3):
        label = _ball((18 + k, 18, 10), 7.0)
        prob = np.where(label, 0.9, 0.02)
        if fp_voxels == 50:
            prob[50:55, 44:49, 2:4] = fp_prob  # 5 x 5 x 2 = 50 voxels = 80 mm3
        elif fp_voxels == 1:
            prob[55, 48, 3] = fp_prob
        cases.append(_write_case(tmp, f"fp{k}", prob, label))
    return cases


def test_known_best_rule_removes_false_positive(tmp_path):
    cases = _fp_cases(tmp_path, 50, 0.6)
    cfg = Config()  # current: threshold 0.5, lesions >= 10 mm3: keeps the 80 mm3 false positive
    sel = select_postprocessing(cases, tmp_path, cfg, progress=False)
    lesion = int(_ball((18, 18, 10), 7.0).sum())
    assert lesion > 500  # 50 voxels < 0.1 x lesion: fraction 0.1 removes the false positive
    current = sel.table[sel.table.is_current].iloc[0]
    chosen = sel.table[sel.table.chosen].iloc[0]
    assert current.mean_dice == pytest.approx(np.mean([
        2 * int(_ball((18 + k, 18, 10), 7.0).sum()) / (2 * int(_ball((18 + k, 18, 10), 7.0).sum()) + 50) for k in range(3)]))
    assert chosen.mean_dice == 1.0
    # every rule removing the FP ties at Dice 1 and HD95 0: the first in grid order wins
    assert sel.chosen == {"threshold": 0.3, "min_lesion_mm3": 0.0, "min_component_fraction": 0.1,
                          "fill_holes": False, "largest_component": False}
    assert chosen.mean_hd95_mm == 0.0 and current.mean_hd95_mm > 20.0
    assert "components >= 0.1 x largest" in sel.reason and "Dice 1.000 vs" in sel.reason
    assert sel.current == {"threshold": 0.5, "min_lesion_mm3": 10.0, "min_component_fraction": 0.0,
                           "fill_holes": False, "largest_component": False}


def test_hd95_decides_within_dice_tolerance(tmp_path):
    """The FP costs less Dice than the tolerance, so HD95 alone must make the switch."""
    cases = _fp_cases(tmp_path, 50, 0.6)
    cfg = _search(thresholds=[0.5, 0.7], min_lesion_mm3=[10.0], component_fractions=[0.0], fill_holes=[False],
                  dice_tolerance=0.05, min_gain=0.05)
    sel = select_postprocessing(cases, tmp_path, cfg, progress=False)
    assert sel.chosen["threshold"] == 0.7
    assert "HD95 better by" in sel.reason
    cfg.cv.postprocess.min_hd95_gain_mm = 1000.0  # no HD95 gain is enough -> current kept
    sel = select_postprocessing(cases, tmp_path, cfg, progress=False)
    assert sel.chosen["threshold"] == 0.5 and sel.reason.startswith("kept current rule")


def test_small_gain_keeps_current(tmp_path):
    cases = _fp_cases(tmp_path, 1, 0.6)  # a 1-voxel FP: Dice gain ~0.0006, HD95 unchanged
    cfg = Config()
    cfg.inference.min_lesion_mm3 = 0.0
    sel = select_postprocessing(cases, tmp_path, cfg, progress=False)
    assert sel.chosen == sel.current
    assert sel.chosen["threshold"] == 0.5 and sel.chosen["min_lesion_mm3"] == 0.0
    assert sel.reason.startswith("kept current rule")
    best = sel.table.iloc[0]
    current = sel.table[sel.table.is_current].iloc[0]
    assert 0 < best.mean_dice - current.mean_dice < cfg.cv.postprocess.min_gain
    cfg.cv.postprocess.min_gain = 0.0001
    sel = select_postprocessing(cases, tmp_path, cfg, progress=False)
    assert sel.chosen == {"threshold": 0.3, "min_lesion_mm3": 0.0, "min_component_fraction": 0.1,
                          "fill_holes": False, "largest_component": False}


def test_largest_component_maps_to_fraction_one(tmp_path):
    cases = _fp_cases(tmp_path, 50, 0.6)
    cfg = Config()
    cfg.inference.largest_component = True
    sel = select_postprocessing(cases, tmp_path, cfg, progress=False)
    assert sel.current["min_component_fraction"] == 1.0 and sel.current["largest_component"] is False
    assert sel.table[sel.table.is_current].iloc[0].mean_dice == 1.0


def test_missing_prob_names_file(tmp_path):
    cases = _fp_cases(tmp_path, 0, 0.0)
    (tmp_path / "fp1_prob.nii.gz").unlink()
    with pytest.raises(InputFileError, match="fp1_prob.nii.gz"):
        select_postprocessing(cases, tmp_path, Config(), progress=False)


def test_grid_mismatch_raises(tmp_path):
    cases = _fp_cases(tmp_path, 0, 0.0)
    label = _ball((18, 18, 10), 7.0)
    _write_case(tmp_path, "fp2", np.where(label, 0.9, 0.0), label, prob_affine=make_affine("ras", spacing=SPACING))
    with pytest.raises(GeometryMismatchError, match="fp2_prob.nii.gz"):
        select_postprocessing(cases, tmp_path, Config(), progress=False)


def test_write_read_round_trip(tmp_path):
    cases = _fp_cases(tmp_path, 50, 0.6)
    cfg = _search(thresholds=[0.5, 0.7], min_lesion_mm3=[0.0, 10.0], component_fractions=[0.0], fill_holes=[False])
    sel = select_postprocessing(cases, tmp_path, cfg, progress=False)
    paths = write_selection(sel, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"postprocess.json", "postprocess_candidates.csv", "postprocess_per_case.csv"}
    data = json.loads(paths["selection"].read_text())
    assert data["n_cases"] == 3 and data["search"]["thresholds"] == [0.5, 0.7] and data["reason"] == sel.reason
    assert read_selection(paths["selection"]) == sel.chosen == {
        "threshold": 0.7, "min_lesion_mm3": 0.0, "min_component_fraction": 0.0, "fill_holes": False, "largest_component": False}
    assert read_selection(tmp_path / "out") == sel.chosen
    import pandas as pd

    table = pd.read_csv(paths["candidates"])
    assert len(table) == 4 and table.chosen.sum() == 1
    assert len(pd.read_csv(paths["per_case"])) == 3 * 4


@pytest.mark.parametrize("text, match", [
    ("{not json", "not a readable"),
    ('{"current": {}}', "no 'chosen'"),
    ('{"chosen": {"threshold": 1.5, "min_lesion_mm3": 0, "min_component_fraction": 0, "fill_holes": false, '
     '"largest_component": false}}', "threshold"),
    ('{"chosen": {"threshold": 0.5}}', "missing"),
])
def test_read_selection_rejects_broken_file(tmp_path, text, match):
    path = tmp_path / "postprocess.json"
    path.write_text(text)
    with pytest.raises(MedsegError, match=match) as info:
        read_selection(path)
    assert str(path) in str(info.value)


def test_undefined_hd95_ranks_last(tmp_path):
    """Threshold 0.7 removes case 0's false positive but also case 1's only (prob 0.6) lesion:
    its mean HD95 over the one defined case is 0, yet the rule with no undefined case must win."""
    cases = _fp_cases(tmp_path, 50, 0.6)[:1]
    label = _ball((30, 28, 10), 2.0)
    cases.append(_write_case(tmp_path, "weak", np.where(label, 0.6, 0.0), label))
    cfg = _search(thresholds=[0.7, 0.5], min_lesion_mm3=[10.0], component_fractions=[0.0], fill_holes=[False],
                  dice_tolerance=1.0)
    sel = select_postprocessing(cases, tmp_path, cfg, progress=False)
    rows = sel.table.set_index("threshold")
    assert rows.loc[0.7].n_hd95_undefined == 1 and rows.loc[0.7].mean_hd95_mm == 0.0
    assert rows.loc[0.5].n_hd95_undefined == 0 and rows.loc[0.5].mean_hd95_mm > 10.0
    assert sel.chosen["threshold"] == 0.5 and sel.reason.startswith("current rule")


# --- lesion-aware objective (cv.postprocess.objective) ---------------------------------------


def _lesion_f1(mask: np.ndarray, label: np.ndarray, cfg: Config) -> float:
    """Lesion F1 of one mask the plain way: label both, overlap table, match (as evaluation)."""
    from medseg.geometry import label_components
    from medseg.metrics.lesion import lesion_counts, match_lesions, overlap_table

    ev = cfg.evaluation
    ref, n_ref = label_components(label, ev.connectivity)
    pred, n_pred = label_components(mask, ev.connectivity)
    return lesion_counts(match_lesions(overlap_table(ref, pred, n_ref, n_pred), ev.matching, ev.iou_threshold)).f1


@pytest.mark.parametrize("matching,eval_connectivity", [("iou", 26), ("overlap", 26), ("iou", 6)])
def test_lesion_f1_of_every_rule_equals_evaluation(tmp_path, rng, matching, eval_connectivity):
    """The per-rule lesion F1 from the component tables equals the F1 of postprocess's own mask
    labelled and matched as the evaluation does (connectivity 6: the relabelling path)."""
    prob, label = _blobs_case(rng)
    label = label | _ball((50, 12, 14), 2.0) | _ball((8, 48, 4), 1.5)  # small true lesions too
    cases = [_write_case(tmp_path, "c0", prob, label)]
    cfg = _search(objective="both", min_lesion_mm3=[0.0, 3.0, 100.0], component_fractions=[0.0, 0.3, 1.0])
    cfg.evaluation.matching = matching
    cfg.evaluation.connectivity = eval_connectivity
    sel = select_postprocessing(cases, tmp_path, cfg, progress=False)
    rules = sel.table.set_index("candidate").sort_index()
    assert sel.per_case.lesion_f1.notna().all() and sel.objective == "both"
    seen = set()
    for row in sel.per_case.itertuples():
        r = rules.loc[row.candidate]
        mask = postprocess(prob.astype(np.float32), SPACING, InferenceConfig(
            threshold=r.threshold, min_lesion_mm3=r.min_lesion_mm3, min_component_fraction=r.component_fraction,
            fill_holes=bool(r.fill_holes))).astype(bool)
        expected = _lesion_f1(mask, label, cfg)
        assert row.lesion_f1 == pytest.approx(expected, abs=1e-12)
        seen.add(round(expected, 6))
    assert len(seen) > 2  # the rules differ in lesion F1: the comparison is not vacuous


def _many_small_lesions_cases(tmp: Path) -> list[Case]:
    """3 cases: one large lesion predicted exactly, 10 small true lesions (2x2x1 voxels, 6.4 mm3)
    predicted exactly, and 10 small false positives (3x2x1 voxels, 9.6 mm3) at the same
    probability. No rule separates the small true lesions from the false ones; dropping them all
    (lesions >= 10 mm3, or components >= 0.25 x largest) wins Dice (60 false voxels gone for 40
    true ones lost) but finds 1 of 11 lesions (F1 0.17); keeping them all finds 11 (F1 0.69)."""
    cases = []
    for k in range(3):
        label = _ball((16 + k, 16, 10), 8.0)
        prob = np.where(label, 0.9, 0.01)
        for n in range(10):
            i, j, kk = 36 + 5 * (n % 5), 4 + 10 * (n // 5) + k, 2 + 3 * (n % 3)
            label[i:i + 2, j:j + 2, kk] = True
            prob[i:i + 2, j:j + 2, kk] = 0.9
            prob[i:i + 3, j + 26:j + 28, kk] = 0.9  # a false positive beside it
        cases.append(_write_case(tmp, f"small{k}", prob, label))
    return cases


def test_lesion_objective_keeps_small_lesions_the_dice_objective_drops(tmp_path):
    cases = _many_small_lesions_cases(tmp_path)
    grid = {"min_lesion_mm3": [0.0, 10.0], "component_fractions": [0.0, 0.25]}
    by_dice = select_postprocessing(cases, tmp_path, _search(objective="dice", **grid), progress=False)
    by_lesions = select_postprocessing(cases, tmp_path, _search(objective="both", **grid), progress=False)
    # Dice keeps the plan's rule, which drops every small lesion (lesions >= 10 mm3)
    assert by_dice.chosen["min_lesion_mm3"] == 10.0 or by_dice.chosen["min_component_fraction"] == 0.25
    per_case = by_dice.per_case.merge(by_dice.table[["candidate", "chosen"]])
    big = [int(_ball((16 + k, 16, 10), 8.0).sum()) for k in range(3)]
    expected = [2 * b / (2 * b + 40) for b in big]  # the 40 small true voxels are missed
    assert per_case[per_case.chosen].dice.tolist() == pytest.approx(expected)
    assert per_case[per_case.chosen].lesion_f1.tolist() == pytest.approx([2 / 12] * 3)  # scored, not used
    # both: the rule that keeps all 11 lesions per case (lesion F1 1.0) at a small Dice cost
    assert by_lesions.chosen["min_lesion_mm3"] == 0.0 and by_lesions.chosen["min_component_fraction"] == 0.0
    chosen = by_lesions.table[by_lesions.table.chosen].iloc[0]
    assert chosen.mean_lesion_f1 == pytest.approx(22 / 32)  # 11 found, 10 false: 2 x 11 / (2 x 11 + 10)
    assert chosen.mean_dice < by_dice.table[by_dice.table.chosen].iloc[0].mean_dice
    current = by_lesions.table[by_lesions.table.is_current].iloc[0]
    assert current.mean_lesion_f1 == pytest.approx(2 / 12)  # 1 of 11 found: F1 = 2 / (2 + 10)
    assert "lesion F1" in by_lesions.reason and "objective both" in by_lesions.reason
    summary = json.loads(write_selection(by_lesions, tmp_path / "out")["selection"].read_text())
    assert summary["objective"] == "both"


def test_lesion_f1_margin_lets_dice_decide_among_near_best(tmp_path):
    """With a margin wide enough to admit the rule that drops the small lesions, 'both' is Dice."""
    cases = _many_small_lesions_cases(tmp_path)
    wide = select_postprocessing(cases, tmp_path, _search(objective="both", lesion_f1_margin=0.9,
                                                          min_lesion_mm3=[0.0, 10.0]), progress=False)
    assert wide.chosen["min_lesion_mm3"] == 10.0  # the plan's rule, Dice 1.0, F1 0.17 admitted
    strict = select_postprocessing(cases, tmp_path, _search(objective="lesion_f1", min_lesion_mm3=[0.0, 10.0]),
                                   progress=False)
    assert strict.chosen["min_lesion_mm3"] == 0.0
