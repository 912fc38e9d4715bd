"""Configurations chosen on cross-validation (cv.candidates): scores, the choice, the pipeline."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_affine, write_nifti
from pydantic import ValidationError

from medseg.auto.candidates import choose_combination, choose_tta, combination_name, score_combinations
from medseg.config import CandidateConfig, Config, CrossValidationConfig
from medseg.manifest import Case

SHAPE = (40, 36, 12)
AFFINE = make_affine("lps", spacing=(1.0, 1.2, 3.0))


def _ball(center, radius, shape=SHAPE):
    grid = np.indices(shape, dtype=np.float64)
    return sum((grid[a] - center[a]) ** 2 for a in range(3)) <= radius**2


def _cases(tmp_path, n=4):
    """n cases, one ball lesion each; candidate 'good' predicts it shifted by one voxel, 'poor'
    by three, 'other' by two in the opposite direction (so 'good'+'other' averaged beats both)."""
    cases, dirs = [], {name: tmp_path / name for name in ("good", "poor", "other")}
    for d in dirs.values():
        d.mkdir()
    for k in range(n):
        center = (18 + k, 17, 6)
        label = _ball(center, 7)
        label_path = write_nifti(tmp_path / f"c{k}_seg.nii.gz", label.astype(np.uint8), AFFINE)
        for name, shift in (("good", 1), ("poor", 3), ("other", -2)):
            prob = _ball((center[0] + shift, center[1], center[2]), 7).astype(np.float32) * 0.9
            write_nifti(dirs[name] / f"c{k}_prob.nii.gz", prob, AFFINE)
        cases.append(Case(f"c{k}", f"p{k}", "MR", {}, label_path, "train"))
    return cases, dirs


def test_scores_equal_the_dice_of_each_averaged_map(tmp_path):
    cases, dirs = _cases(tmp_path, 2)
    dice = score_combinations(cases, dirs, [("good",), ("poor",), ("good", "other")], Config())
    for case in cases:
        k, center = int(case.case_id[1:]), (18 + int(case.case_id[1:]), 17, 6)
        label = _ball(center, 7)
        for combo, mask in (("good", _ball((center[0] + 1, 17, 6), 7)), ("poor", _ball((center[0] + 3, 17, 6), 7)),
                            ("good+other", _ball((center[0] + 1, 17, 6), 7) & _ball((center[0] - 2, 17, 6), 7))):
            expected = 2 * (mask & label).sum() / (mask.sum() + label.sum())  # average 0.45 < 0.5 where one says no
            assert dice.loc[case.case_id, combo] == pytest.approx(expected), (k, combo)


def test_choice_picks_the_known_best_single_and_a_pair_only_when_it_gains(tmp_path):
    cases, dirs = _cases(tmp_path)
    patients = [c.patient_id for c in cases]
    names = ["poor", "good", "other"]
    combos = [(n,) for n in names] + [("poor", "good"), ("poor", "other"), ("good", "other")]
    dice = score_combinations(cases, dirs, combos, Config())
    assert dice["good"].mean() > dice["other"].mean() > dice["poor"].mean()
    singles = choose_combination(dice, patients, names, pairs=False, min_gain=0.002)
    assert singles.names == ("good",) and "best single candidate good" in singles.reasons[0]
    assert list(singles.table["combination"])[0] == "good"
    # the averaged pair good+other: the intersection of two shifted balls, worse than good here
    paired = choose_combination(dice, patients, names, pairs=True, min_gain=0.002)
    best_pair = max(["poor+good", "poor+other", "good+other"], key=lambda n: dice[n].mean())
    gain = dice[best_pair].mean() - dice["good"].mean()
    assert paired.names == (tuple(best_pair.split("+")) if gain > 0.002 else ("good",))
    assert paired.steps[0]["step"] == "pair" and paired.steps[0]["mean"] == pytest.approx(gain)
    # a constructed table where the pair gains clearly: it is shipped, with its interval and wins
    table = pd.DataFrame({"a": [0.80, 0.70, 0.75, 0.90], "b": [0.78, 0.72, 0.74, 0.88],
                          "a+b": [0.84, 0.76, 0.79, 0.92]})
    choice = choose_combination(table, ["p1", "p2", "p3", "p4"], ["a", "b"], pairs=True, min_gain=0.002)
    assert choice.names == ("a", "b") and choice.name == "a+b"
    assert choice.steps[0]["wins"] == 4 and choice.steps[0]["ci95"][0] > 0
    # below the gain: the single one
    table["a+b"] = table["a"] + 0.001
    assert choose_combination(table, ["p1", "p2", "p3", "p4"], ["a", "b"], True, 0.002).names == ("a",)


def test_mirroring_kept_only_when_it_helps():
    base = choose_combination(pd.DataFrame({"a": [0.8, 0.7, 0.9], "b": [0.7, 0.6, 0.8]}), ["x", "y", "z"],
                              ["a", "b"], pairs=False, min_gain=0.002)
    without = np.array([0.8, 0.7, 0.9])
    assert choose_tta(base, without, without + 0.01, ["x", "y", "z"], 0.002).tta is True
    base.tta = False
    assert choose_tta(base, without, without + 0.001, ["x", "y", "z"], 0.002).tta is False
    assert base.name == "a" and combination_name(["a", "b"], True) == "a+b+tta"


def test_candidate_config_is_validated():
    with pytest.raises(ValidationError, match="model.\\* or train.\\*"):
        CandidateConfig(name="x", set={"preprocess.context_slices": 1})
    with pytest.raises(ValidationError, match="distinct"):
        CrossValidationConfig(candidates=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValidationError, match="two or more"):
        CrossValidationConfig(candidates=[{"name": "a"}])
    with pytest.raises(ValidationError):
        CandidateConfig(name="../x")


@pytest.mark.slow  # two 2-fold cross-validations and the mirrored out-of-fold pass: ~60 s on 2 cores
def test_auto_pipeline_with_candidates_ships_the_chosen_ones(tmp_path, phantom_manifest):
    from conftest import REPO
    from test_pipeline_auto import TINY, _brats_like

    from medseg.auto.model_folder import read_model_folder
    from medseg.cli import main

    source = _brats_like(tmp_path, phantom_manifest)
    run_dir = tmp_path / "run"
    candidates = "[{name: deeplab, set: {}}, {name: unet, set: {model.arch: unet_inception}}]"
    args = ["run", str(REPO / "pipelines" / "auto.yaml"), "--set", f"pipeline.source={source}", "--out", str(run_dir),
            "--no-progress", *TINY, "--set", "cv.folds=2", "--set", f"cv.candidates={candidates}",
            "--set", "cv.try_tta=true"]  # fmt: skip
    assert main(args) == 0
    cv = run_dir / "cv"
    choice = json.loads((cv / "candidates.json").read_text())
    assert set(choice["chosen"]) <= {"deeplab", "unet"} and len(choice["reasons"]) == 3  # single, pair, mirroring
    table = pd.read_csv(cv / "candidates_table.csv")
    assert set(table["combination"]) == {"deeplab", "unet", "deeplab+unet"}
    for name in ("deeplab", "unet"):
        assert (cv / "candidates" / name / "cv_summary.json").is_file()
        mirrored = len(list((cv / "candidates" / name / "oof_tta").glob("*_prob.nii.gz")))
        assert mirrored == (5 if name in choice["chosen"] else 0)  # mirroring is tried on the chosen only
    model = read_model_folder(run_dir / "model")
    assert [p.name for p in model.checkpoints] == [f"{n}_fold_{k}.pt" for n in choice["chosen"] for k in range(2)]
    assert model.postprocess["tta"] is choice["tta"]
    arch = {"deeplab": "deeplabv3plus", "unet": "unet_inception"}[choice["chosen"][0]]
    assert f"arch: {arch}" in (run_dir / "model" / "config.yaml").read_text()
    # the shipped folder predicts the test split (none here) and new cases: infer with it
    out = tmp_path / "pred"
    assert main(["infer", "--model", str(run_dir / "model"), "--manifest", str(run_dir / "import" / "manifest.csv"),
                 "--out", str(out), "--no-progress"]) == 0


def test_report_shows_the_candidates_choice(tmp_path):
    from medseg.auto.candidates import write_choice
    from medseg.report.cv import candidates_part

    table = pd.DataFrame({"a": [0.80, 0.70, 0.75, 0.90], "b": [0.78, 0.72, 0.74, 0.88], "a+b": [0.84, 0.76, 0.79, 0.92]})
    choice = choose_combination(table, ["p1", "p2", "p3", "p4"], ["a", "b"], pairs=True, min_gain=0.002)
    write_choice(choice, tmp_path, [CandidateConfig(name="a"), CandidateConfig(name="b", set={"model.arch": "unet"})])
    html = candidates_part(tmp_path)
    assert "Configuration chosen on cross-validation: a+b" in html and "pair a+b averaged" in html
    assert html.count("<tr") >= 4  # header + 3 combinations
