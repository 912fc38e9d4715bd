"""`evaluate` on small synthetic NIfTI cases with a non-identity affine: tables, scores, regions, errors."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medseg.cli import main
from medseg.config import Config, load_config
from medseg.errors import ManifestError
from medseg.evaluation.runner import evaluate

# i -> anterior (0.9 mm), j -> superior (2 mm, the axial slicing axis), k -> left (1.5 mm, flipped R)
AFFINE = np.array(
    [[0.0, 0.0, -1.5, 20.0], [0.9, 0.0, 0.0, -10.0], [0.0, 2.0, 0.0, 5.0], [0.0, 0.0, 0.0, 1.0]]
)
SHAPE = (24, 20, 16)
VOXEL_MM3 = 0.9 * 2.0 * 1.5
A = (slice(2, 8), slice(2, 8), slice(2, 8))  # reference lesion, raw value 1, found exactly (216 voxels)
B = (slice(14, 16), slice(14, 16), slice(10, 12))  # reference lesion, raw value 2, missed (8 voxels)
FP = (slice(18, 21), slice(10, 13), slice(2, 5))  # false-positive prediction (27 voxels)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def build(tmp: Path, pred_classes: bool = False) -> tuple[Path, Path]:
    """Manifest with c1 (two lesions), c2 (empty label), c3 (no label, skipped); prediction folder."""
    data, pred = tmp / "data", tmp / "pred"
    data.mkdir()
    pred.mkdir()
    write_nifti(data / "img.nii.gz", np.zeros(SHAPE, np.float32))
    ref1 = np.zeros(SHAPE, np.uint8)
    ref1[A], ref1[B] = 1, 2
    write_nifti(data / "c1_seg.nii.gz", ref1)
    write_nifti(data / "c2_seg.nii.gz", np.zeros(SHAPE, np.uint8))
    mask1 = np.zeros(SHAPE, np.uint8)
    mask1[A] = 1
    mask1[FP] = 2 if pred_classes else 1
    write_nifti(pred / "c1_mask.nii.gz", mask1)
    write_nifti(pred / "c2_mask.nii.gz", np.zeros(SHAPE, np.uint8))
    manifest = tmp / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "patient_id", "modality", "image_t1", "label", "split"])
        w.writerow(["c1", "p1", "MR", "data/img.nii.gz", "data/c1_seg.nii.gz", "test"])
        w.writerow(["c2", "p2", "MR", "data/img.nii.gz", "data/c2_seg.nii.gz", "test"])
        w.writerow(["c3", "p3", "MR", "data/img.nii.gz", "", "test"])
    return manifest, pred


def test_tables_and_summary(tmp_path: Path) -> None:
    manifest, pred = build(tmp_path)
    out = tmp_path / "out"
    summary = evaluate(pred, manifest, out, Config(), progress=False)
    assert summary["n_cases"] == 2 and summary["case_ids"] == ["c1", "c2"]  # c3 has no label

    per_case = pd.read_csv(out / "metrics_per_case.csv").set_index("case_id")
    c1 = per_case.loc["c1"]
    assert c1["dice"] == pytest.approx(2 * 216 / (224 + 243), abs=5e-5)  # tables: 4 digits
    assert c1["ref_volume_ml"] == pytest.approx(224 * VOXEL_MM3 / 1000, abs=5e-5)
    assert (c1["lesion_tp"], c1["lesion_fp"], c1["lesion_fn"]) == (1, 1, 1)
    assert c1["lesion_dice"] == pytest.approx(1 / 3, abs=5e-5)  # A matched exactly; B (FN) and FP count 0
    assert c1["empty"] == "none" and per_case.loc["c2", "empty"] == "both"
    # axial = array axis j: reference slices 2..7, 14, 15; predicted 2..7, 10..12 (of 20)
    assert (c1["slice_tp"], c1["slice_fp"], c1["slice_fn"], c1["slice_tn"]) == (6, 3, 2, 9)
    assert c1["score_source"] == "none"

    matches = pd.read_csv(out / "lesion_matches.csv")
    assert len(matches) == 4  # c1: two reference + two predicted lesions; c2 has none
    ref_a = matches[(matches.side == "reference") & (matches.voxels == 216)].iloc[0]
    assert bool(ref_a.matched) and ref_a.iou == pytest.approx(1.0)
    assert ref_a.volume_mm3 == pytest.approx(216 * VOXEL_MM3, abs=0.05)  # 0.1 mm3
    assert (ref_a.centroid_i, ref_a.centroid_j, ref_a.centroid_k) == (4.5, 4.5, 4.5)

    # no scores: ranking by volume puts A (TP) before FP; 2 reference lesions -> AP = 1/2
    assert summary["score_source"] == "none"
    region = summary["per_region"]["lesion"]
    assert region["detection"]["ap"]["0.5"] == pytest.approx(0.5)
    assert summary["map"]["at_iou_threshold"] == pytest.approx(0.5)
    assert region["voxel"]["global_dice"] == pytest.approx(2 * 216 / (224 + 243))
    assert region["voxel"]["empty_cases"] == {"none": 1, "both": 1, "reference": 0, "prediction": 0}
    assert region["voxel"]["dice"]["mean"] == pytest.approx((2 * 216 / 467 + 1) / 2)
    assert region["lesion"]["pooled"]["tp"] == 1
    # A = 216 * 2.7 = 583 mm³ (medium, found), B = 21.6 mm³ (small, missed); edges 500 / 5000 mm³
    by_size = region["lesion"]["recall_by_size"]
    assert (by_size["small"]["recall"], by_size["medium"]["recall"], by_size["large"]["recall"]) == (
        0.0,
        1.0,
        None,
    )
    assert region["slices"]["sensitivity"] == pytest.approx(6 / 8)
    assert region["slices"]["specificity"] == pytest.approx(29 / 32)

    curve = pd.read_csv(out / "pr_curve.csv")
    assert list(curve.columns[:6]) == ["class", "iou_threshold", "rank", "score", "precision", "recall"]
    assert len(curve) == 5 * 2  # thresholds 0.1..0.5 x two predicted lesions
    at_half = curve[curve.iou_threshold == 0.5]
    assert at_half.precision.tolist() == [1.0, 0.5] and at_half.recall.tolist() == [0.5, 0.5]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["per_region"]["lesion"]["voxel"]["rel_volume_diff"]["n_nan"] == 1  # c2: no reference


def test_probability_and_instance_scores_rank_lesions(tmp_path: Path) -> None:
    manifest, pred = build(tmp_path)
    prob = np.zeros(SHAPE, np.float32)
    prob[A], prob[FP] = 0.6, 0.9
    write_nifti(pred / "c1_prob.nii.gz", prob)
    summary = evaluate(pred, manifest, tmp_path / "prob", Config(), progress=False)
    # FP outranks A: hit at rank 2 of 2 reference lesions -> AP = (1/2) / 2; c2 has no prob file
    assert summary["per_region"]["lesion"]["detection"]["ap"]["0.5"] == pytest.approx(0.25)
    assert summary["score_source"] == "probability"  # c2 predicts no lesion: nothing of it is ranked

    instances = np.zeros(SHAPE, np.int16)
    instances[A], instances[FP] = 1, 2
    write_nifti(pred / "c1_lesions.nii.gz", instances)
    pd.DataFrame(
        {
            "lesion_id": [1, 2],
            "voxels": [216, 27],
            "volume_ml": [0.6, 0.07],
            "score_mean": [0.95, 0.1],
            "score_max": [1.0, 0.2],
        }
    ).to_csv(pred / "c1_lesions.csv", index=False)
    summary = evaluate(pred, manifest, tmp_path / "inst", Config(), progress=False)
    assert summary["per_region"]["lesion"]["detection"]["ap"]["0.5"] == pytest.approx(0.5)
    matches = pd.read_csv(tmp_path / "inst" / "lesion_matches.csv")
    assert sorted(matches[matches.side == "prediction"].score.tolist()) == [0.1, 0.95]


def test_regions_with_prediction_classes(tmp_path: Path) -> None:
    manifest, pred = build(tmp_path, pred_classes=True)  # A predicted as class 1, FP as class 2
    cfg = load_config(
        None,
        [
            "evaluation.regions.raw1=[1]",
            "evaluation.regions.raw2=[2]",
            "evaluation.regions.raw1_cls1={reference_values: [1], prediction_values: [1]}",
        ],
    )
    summary = evaluate(pred, manifest, tmp_path / "out", cfg, progress=False)
    per_case = pd.read_csv(tmp_path / "out" / "metrics_per_case.csv").set_index(["case_id", "region"])
    assert per_case.loc[("c1", "raw1"), "dice"] == pytest.approx(2 * 216 / (216 + 243), abs=5e-5)
    assert per_case.loc[("c1", "raw2"), "dice"] == 0.0
    assert per_case.loc[("c1", "raw1_cls1"), "dice"] == 1.0
    assert summary["regions"] == ["raw1", "raw2", "raw1_cls1"]
    # mAP = mean over classes: raw1 AP 1 (A ranks first), raw2 AP 0, raw1_cls1 AP 1
    assert summary["map"]["at_iou_threshold"] == pytest.approx(2 / 3)


def test_overlap_matching_mode(tmp_path: Path) -> None:
    manifest, pred = build(tmp_path)
    cfg = load_config(None, ["evaluation.matching=overlap"])
    summary = evaluate(pred, manifest, tmp_path / "out", cfg, progress=False)
    assert summary["per_region"]["lesion"]["lesion"]["matching"] == "overlap"
    assert summary["per_region"]["lesion"]["lesion"]["pooled"]["f1"] == pytest.approx(0.5)


def _only_failure(summary: dict, out: Path, case_id: str, pattern: str) -> None:
    """The one failed case, in the summary and in ``failures.csv``, with an error matching ``pattern``."""
    assert [f["case_id"] for f in summary["failures"]] == [case_id] and summary["n_failed"] == 1
    assert re.search(pattern, summary["failures"][0]["error"]), summary["failures"][0]["error"]
    table = pd.read_csv(out / "failures.csv")
    assert table["case_id"].tolist() == [case_id] and table["error"][0] == summary["failures"][0]["error"]
    assert case_id not in summary["case_ids"]


def test_missing_prediction_names_the_file(tmp_path: Path) -> None:
    """A failing case is recorded and the others are evaluated."""
    manifest, pred = build(tmp_path)
    (pred / "c2_mask.nii.gz").unlink()
    summary = evaluate(pred, manifest, tmp_path / "out", Config(), progress=False)
    _only_failure(summary, tmp_path / "out", "c2", "c2_mask.nii.gz.*prediction for case 'c2' not found")
    assert summary["case_ids"] == ["c1"]


def test_grid_mismatch_names_both_files(tmp_path: Path) -> None:
    manifest, pred = build(tmp_path)
    shifted = AFFINE.copy()
    shifted[0, 3] += 1.0
    write_nifti(pred / "c2_mask.nii.gz", np.zeros(SHAPE, np.uint8), shifted)
    summary = evaluate(pred, manifest, tmp_path / "out", Config(), progress=False)
    _only_failure(summary, tmp_path / "out", "c2", "grid mismatch.*c2_seg.nii.gz.*c2_mask.nii.gz")


def test_unexpected_label_value(tmp_path: Path) -> None:
    manifest, pred = build(tmp_path)
    cfg = load_config(None, ["data.labels.allowed_values=[0, 1]"])
    summary = evaluate(pred, manifest, tmp_path / "out", cfg, progress=False)
    _only_failure(summary, tmp_path / "out", "c1", r"c1_seg.nii.gz.*unexpected label value\(s\) \[2\]")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest, pred = build(tmp_path)
    out = tmp_path / "out"
    args = ["evaluate", "--pred", str(pred), "--manifest", str(manifest), "--out", str(out), "--no-progress"]
    assert main([*args, "--split", "test", "--set", "evaluation.connectivity=6"]) == 0
    assert "lesion: mean Dice" in capsys.readouterr().out
    assert load_config(out / "config_used.yaml").evaluation.connectivity == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["evaluation"]["split"] == "test"
    assert math.isclose(summary["map"]["mean_over_thresholds"], 0.5)

    assert main([*args, "--split", "train"]) == 2
    assert "no case with a label in split 'train'" in capsys.readouterr().err


def test_no_labelled_case_is_an_error(tmp_path: Path) -> None:
    manifest, pred = build(tmp_path)
    cfg = load_config(None, ["evaluation.split=val"])
    with pytest.raises(ManifestError, match="nothing to evaluate"):
        evaluate(pred, manifest, tmp_path / "out", cfg, progress=False)


def test_lesion_table_must_cover_the_instance_map(tmp_path: Path) -> None:
    manifest, pred = build(tmp_path)
    instances = np.zeros(SHAPE, np.int16)
    instances[A], instances[FP] = 1, 7
    write_nifti(pred / "c1_lesions.nii.gz", instances)
    pd.DataFrame(
        {"lesion_id": [1], "voxels": [216], "volume_ml": [0.6], "score_mean": [0.9], "score_max": [1.0]}
    ).to_csv(pred / "c1_lesions.csv", index=False)
    summary = evaluate(pred, manifest, tmp_path / "out", Config(), progress=False)
    _only_failure(summary, tmp_path / "out", "c1", r"c1_lesions.csv: case c1, region lesion: lesion_id\(s\) \[7\]")
    # an instance map without its table is ignored (with a warning): no scores
    (pred / "c1_lesions.csv").unlink()
    assert evaluate(pred, manifest, tmp_path / "out", Config(), progress=False)["score_source"] == "none"


def test_learned_instances_are_the_predicted_lesions(tmp_path: Path) -> None:
    """An instance model's outputs: its instances are the lesions (touching ones stay two), its
    learned scores rank them; an instance-labelled reference (instances: values) counts two."""
    manifest, pred = build(tmp_path)
    left, right = (slice(2, 8), slice(2, 8), slice(2, 5)), (slice(2, 8), slice(2, 8), slice(5, 8))  # A in two halves
    ref = np.zeros(SHAPE, np.uint8)
    ref[left], ref[right] = 3, 5
    write_nifti(tmp_path / "data" / "c1_seg.nii.gz", ref)
    mask = np.zeros(SHAPE, np.uint8)
    mask[A] = 1
    write_nifti(pred / "c1_mask.nii.gz", mask)
    instances = np.zeros(SHAPE, np.int16)
    instances[left], instances[right] = 2, 1
    write_nifti(pred / "c1_lesions.nii.gz", instances)
    table = {"lesion_id": [1, 2], "score_mean": [0.4, 0.9], "score_source": ["learned", "learned"]}
    pd.DataFrame(table).to_csv(pred / "c1_lesions.csv", index=False)

    cfg = Config.model_validate({"data": {"labels": {"instances": "values"}}})
    summary = evaluate(pred, manifest, tmp_path / "learned", cfg, progress=False)
    assert summary["score_source"] == "learned"
    pooled = summary["per_region"]["lesion"]["lesion"]["pooled"]
    assert (pooled["n_ref"], pooled["n_pred"], pooled["tp"], pooled["f1"]) == (2, 2, 2, 1.0)
    matches = pd.read_csv(tmp_path / "learned" / "lesion_matches.csv")
    assert sorted(matches[matches.side == "prediction"].score.tolist()) == [0.4, 0.9]

    # the same files scored as a plain lesion table: connected components, one predicted lesion
    pd.DataFrame({**table, "score_source": ["probability"] * 2}).to_csv(pred / "c1_lesions.csv", index=False)
    plain = evaluate(pred, manifest, tmp_path / "plain", cfg, progress=False)
    assert plain["score_source"] == "lesions_csv"
    assert plain["per_region"]["lesion"]["lesion"]["pooled"]["n_pred"] == 1
