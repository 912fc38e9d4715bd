"""`pipelines/auto.yaml` end to end on phantoms: import -> plan -> cv -> postprocess -> infer test
-> evaluate -> report, then a resumed run that redoes nothing, and the model folder it leaves."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO

from medseg.auto.model_folder import read_model_folder
from medseg.cli import main
from medseg.io import read_volume
from medseg.manifest import read_manifest

pytestmark = pytest.mark.slow

TINY = ["--set", "train.epochs=1", "--set", "train.samples_per_epoch=16", "--set", "train.batch_size=4",
        "--set", "train.num_workers=0", "--set", "cv.folds=3", "--set", "stage.plan.minutes_per_fold=1",
        "--set", "stage.plan.device=cpu"]  # fmt: skip


def _brats_like(tmp_path, phantom_manifest):
    """Phantoms renamed into a BraTS-like folder (<case>/<case>_<channel>.nii.gz, <case>_seg.nii.gz)."""
    manifest = phantom_manifest(5, (48, 44, 16), seed=4)
    root = tmp_path / "brats_like"
    for case in read_manifest(manifest):
        folder = root / case.case_id
        folder.mkdir(parents=True)
        for channel, path in case.images.items():
            shutil.copy(path, folder / f"{case.case_id}_{channel}.nii.gz")
        shutil.copy(case.label, folder / f"{case.case_id}_seg.nii.gz")
    return root


def test_auto_pipeline_from_a_dataset_folder(tmp_path, capsys, phantom_manifest):
    source = _brats_like(tmp_path, phantom_manifest)
    run_dir = tmp_path / "run"
    args = ["run", str(REPO / "pipelines" / "auto.yaml"), "--set", f"pipeline.source={source}", "--out", str(run_dir),
            "--no-progress", *TINY]  # fmt: skip
    assert main(args) == 0
    state = json.loads((run_dir / "state.json").read_text())
    assert [s for s in state] == ["import", "validate", "plan", "stats", "cv", "postprocess", "infer", "evaluate", "prediction_stats", "report"]
    manifest = read_manifest(run_dir / "import" / "manifest.csv")
    assert len(manifest) == 5 and {c.split for c in manifest} == {"train"}  # every patient in the CV pool

    # the plan's config is the run's config, with the --set overrides on top
    config = (run_dir / "config.yaml").read_text()
    assert "in_channels: 6" in config and "folds: 3" in config
    assert (run_dir / "plan" / "fingerprint.json").is_file()

    table = pd.read_csv(run_dir / "cv" / "cv_table.csv", dtype={"case_id": str})
    assert sorted(table["case_id"][:-1]) == sorted(c.case_id for c in manifest)
    model = read_model_folder(run_dir / "model")
    assert len(model.checkpoints) == 3 and set(model.postprocess) >= {"threshold", "min_lesion_mm3"}
    decision = pd.read_csv(run_dir / "model" / "postprocess_candidates.csv")
    assert decision["chosen"].sum() == 1 and decision["is_current"].sum() == 1
    assert (run_dir / "model" / "cv_chosen" / "cv_summary.json").is_file()

    html = (run_dir / "report" / "report.html").read_text()
    assert "Expected accuracy (cross-validation)" in html and "Post-processing chosen on cross-validation" in html
    assert "Out-of-fold over 5 patients (3 folds)" in html

    # the record names the model: fold checkpoints, the plan's dataset fingerprint, the CV accuracy
    identity = json.loads((run_dir / "provenance.json").read_text())["model_identity"]
    assert [c["file"].rsplit("/", 1)[-1] for c in identity["checkpoints"]] == ["fold_0.pt", "fold_1.pt", "fold_2.pt"]
    fingerprint = (run_dir / "plan" / "fingerprint.json").read_bytes()
    assert (run_dir / "model" / "fingerprint.json").read_bytes() == fingerprint
    assert identity["dataset_fingerprint_sha256"] == hashlib.sha256(fingerprint).hexdigest()
    assert identity["cv_accuracy"]["source"] == "cv_chosen/cv_summary.json" and identity["cv_accuracy"]["n_folds"] == 3
    assert "CV Dice " in html.split("<summary>", 1)[1].split("</summary>", 1)[0]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["inference"]["threshold"] == model.postprocess["threshold"]

    capsys.readouterr()
    assert main(args) == 0  # resumed: nothing is redone
    assert capsys.readouterr().out.count("up to date") == 10
    assert all(v["runs"] == 1 for v in json.loads((run_dir / "state.json").read_text()).values())


def test_auto_pipeline_predicts_the_test_split_with_the_model_folder(tmp_path, phantom_manifest):
    manifest = phantom_manifest(6, (48, 44, 16), seed=5, val_fraction=0.0, test_fraction=0.17)
    test_ids = [c.case_id for c in read_manifest(manifest) if c.split == "test"]
    run_dir = tmp_path / "run"
    assert main(["run", str(REPO / "pipelines" / "auto.yaml"), "--set", f"pipeline.manifest={manifest}",
                 "--out", str(run_dir), "--no-progress", *TINY]) == 0  # fmt: skip
    record = json.loads((run_dir / "predictions" / "inference.json").read_text())
    assert [p.rsplit("/", 1)[-1] for p in record["checkpoints"]] == ["fold_0.pt", "fold_1.pt", "fold_2.pt"]
    rule = read_model_folder(run_dir / "model").postprocess
    assert record["inference"]["threshold"] == rule["threshold"]
    assert sorted(p.name for p in (run_dir / "predictions").glob("*_mask.nii.gz")) == [f"{t}_mask.nii.gz" for t in test_ids]
    summary = json.loads((run_dir / "evaluate" / "summary.json").read_text())
    assert summary["case_ids"] == test_ids
    cv_ids = pd.read_csv(run_dir / "cv" / "cv_table.csv", dtype={"case_id": str})["case_id"].tolist()
    assert not set(test_ids) & set(cv_ids)  # the test patient never enters the cross-validation
    html = (run_dir / "report" / "report.html").read_text()
    assert "Metrics (test split)" in html
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert sorted(provenance["model_checkpoints_sha256"]) == ["fold_0.pt", "fold_1.pt", "fold_2.pt"]

    # the model folder serves a new manifest through infer_report, with its rule
    other = tmp_path / "other"
    assert main(["run", str(REPO / "pipelines" / "infer_report.yaml"), "--set", f"pipeline.model={run_dir / 'model'}",
                 "--set", f"pipeline.manifest={manifest}", "--out", str(other), "--no-progress"]) == 0  # fmt: skip
    record = json.loads((other / "predictions" / "inference.json").read_text())
    assert len(record["checkpoints"]) == 3 and record["inference"]["threshold"] == rule["threshold"]
    assert yaml.safe_load((other / "config.yaml").read_text())["inference"] == record["inference"]  # what ran
    assert json.loads((other / "provenance.json").read_text())["model_identity"]["model_folder"] == str(run_dir / "model")
    assert len(list((other / "predictions").glob("*_mask.nii.gz"))) == 6

    # the review list: the QC score calibrated on the out-of-fold predictions, applied at inference
    qc = json.loads((run_dir / "model" / "qc.json").read_text())
    assert qc["score"] == "uncertain_fraction" and qc["n_cases"] == len(cv_ids) - 1  # every pool case, less "mean"
    assert {c["case_id"] for c in qc["cases"]} == set(cv_ids) - {"mean"} and isinstance(qc["useful"], bool)
    cases = pd.read_csv(other / "predictions" / "cases.csv")
    assert cases["qc_score"].notna().all()
    assert cases["qc_flag"].notna().all() if qc["useful"] else cases["qc_flag"].isna().all()
    assert record["qc"]["threshold"] == qc["threshold"] and "cases" not in record["qc"]
    assert "<h2>Review first</h2>" in (other / "report" / "report.html").read_text()


def test_repeats_per_fold_are_averaged_out_of_fold_and_kept_in_the_model_folder(tmp_path, phantom_manifest):
    """cv.repeats=2: two seeds per fold; a held-out case's probabilities are their average
    (what `medseg infer` gives with both checkpoints), and the model folder keeps all four."""
    source = _brats_like(tmp_path, phantom_manifest)
    run_dir = tmp_path / "run"
    args = ["run", str(REPO / "pipelines" / "auto.yaml"), "--set", f"pipeline.source={source}", "--out", str(run_dir),
            "--no-progress", *TINY, "--set", "cv.folds=2", "--set", "cv.repeats=2", "--set", "train.seed=7"]  # fmt: skip
    assert main(args) == 0
    cv = run_dir / "cv"
    names = ["fold_0", "fold_0_r1", "fold_1", "fold_1_r1"]
    done = {n: json.loads((cv / n / "fold_done.json").read_text()) for n in names}
    assert [(d["fold"], d["repeat"]) for d in done.values()] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    seeds = [yaml.safe_load((cv / n / "config.yaml").read_text())["train"]["seed"] for n in names]
    assert seeds == [7, 8, 7, 8]
    weights = [torch.load(cv / n / "last.pt", weights_only=True)["state_dict"] for n in ("fold_0", "fold_0_r1")]
    assert any(not torch.equal(a, weights[1][k]) for k, a in weights[0].items() if a.is_floating_point())

    summary = json.loads((cv / "cv_summary.json").read_text())
    assert summary["repeats"] == 2
    assert summary["fold_training_seconds"] == pytest.approx(
        [done["fold_0"]["seconds"] + done["fold_0_r1"]["seconds"], done["fold_1"]["seconds"] + done["fold_1_r1"]["seconds"]])
    table = pd.read_csv(cv / "cv_table.csv", dtype={"case_id": str})
    case_id, fold = table["case_id"][0], int(table["fold"][0])
    manifest = run_dir / "import" / "manifest.csv"
    oof = read_volume(cv / "oof" / f"{case_id}_prob.nii.gz").array
    for checkpoints, same in (([f"fold_{fold}", f"fold_{fold}_r1"], True), ([f"fold_{fold}"], False)):
        out = tmp_path / "_".join(checkpoints)
        ckpt_args = [a for c in checkpoints for a in ("--checkpoint", str(cv / c / "last.pt"))]
        assert main(["infer", *ckpt_args, "--manifest", str(manifest), "--out", str(out), "--write-prob",
                     "--no-progress"]) == 0  # fmt: skip
        assert np.allclose(read_volume(out / f"{case_id}_prob.nii.gz").array, oof, atol=1e-6) == same, checkpoints

    model = read_model_folder(run_dir / "model")
    assert [p.name for p in model.checkpoints] == [f"{n}.pt" for n in names]
    assert model.record["summary"]["repeats"] == 2


def test_auto_pipeline_needs_data(tmp_path, capsys):
    assert main(["run", str(REPO / "pipelines" / "auto.yaml"), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "pipeline.source" in capsys.readouterr().err
