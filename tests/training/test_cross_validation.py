"""k-fold cross-validation on phantoms: out-of-fold predictions (each pool case once, by the model
that did not train on it), the CV table, a killed run that resumes, `medseg train --fold`, and a
model folder that `medseg infer --model` loads as one ensemble with its post-processing rule."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import write_tiny_config

from medseg.auto.cross_validation import (
    FOLD_DONE,
    OOF_DIR,
    fold_models,
    run_cross_validation,
)
from medseg.auto.folds import FOLDS_FILE, read_folds
from medseg.auto.model_folder import read_model_folder, write_model_folder
from medseg.cli import main
from medseg.config import load_config
from medseg.engine.setup import check_training_setup
from medseg.io import read_volume
from medseg.manifest import read_manifest
from medseg.metrics.uncertainty import bootstrap_mean_ci
from medseg.outputs import CV_SUMMARY, CV_TABLE

pytestmark = pytest.mark.slow


def write_config(path: Path, manifest: Path, **sections) -> Path:
    return write_tiny_config(path, manifest, {"inference": {"min_lesion_mm3": 0.0}, "cv": {"folds": 3}}, sections)


@pytest.fixture(scope="module")
def data(phantom_manifest) -> Path:
    return phantom_manifest(6, (48, 44, 16), seed=2, val_fraction=0.34, test_fraction=0.17)


@pytest.fixture(scope="module")
def cv_run(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cv")
    cfg = load_config(write_config(tmp / "cfg.yaml", data))
    result = run_cross_validation(cfg, data, tmp / "cv", progress=False)
    return cfg, result, tmp / "cv"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_pool_case_predicted_once_by_the_model_that_did_not_see_it(data, cv_run, tmp_path):
    cfg, result, out = cv_run
    cases = read_manifest(data)
    pool = sorted(c.case_id for c in cases if c.split != "test")
    test_ids = [c.case_id for c in cases if c.split == "test"]
    assert len(pool) == 5 and len(test_ids) == 1
    predicted = sorted(p.name[: -len("_mask.nii.gz")] for p in (out / OOF_DIR).glob("*_mask.nii.gz"))
    assert predicted == pool  # every pool case, no test case
    table = pd.read_csv(out / CV_TABLE, dtype={"case_id": str})
    rows = table[table["case_id"] != "mean"]
    assert sorted(rows["case_id"]) == pool and rows["case_id"].is_unique
    folds = read_folds(out / FOLDS_FILE)
    fold_of = folds.fold_of_patient()
    by_id = {c.case_id: c for c in cases}
    assert all(row.fold == fold_of[by_id[row.case_id].patient_id] for row in rows.itertuples())
    assert table.iloc[-1]["dice"] == pytest.approx(rows["dice"].mean(), abs=5e-5)  # the mean row, to 4 digits
    summary = json.loads((out / CV_SUMMARY).read_text())
    assert summary["n_cases"] == 5 and summary["metrics"]["dice"]["mean"] == pytest.approx(rows["dice"].mean())
    assert summary["metrics"]["dice"]["ci95"] == pytest.approx(list(bootstrap_mean_ci(rows["dice"], rows["patient_id"])))

    # the held-out case's probabilities are its own fold model's, not another fold's
    cfg_local = cfg
    for k in range(folds.n_folds):
        train, held = folds.split(cases, k)
        setup = check_training_setup(cfg_local.model_copy(update={"data": cfg.data.model_copy(update={"manifest": str(data)})}),
                                     k, out)  # fmt: skip
        assert {c.case_id for c in setup.val} == {c.case_id for c in held}
        assert {c.patient_id for c in setup.train}.isdisjoint(folds.patients[k])
        assert not (out / f"fold_{k}" / "best.pt").exists()  # nothing chosen on the held-out fold
    case = next(c for c in cases if c.case_id == pool[0])
    k = fold_of[case.patient_id]
    oof_prob = read_volume(out / OOF_DIR / f"{case.case_id}_prob.nii.gz").array
    manifest_one = tmp_path / "one.csv"
    from medseg.manifest import write_manifest

    write_manifest([case], manifest_one)
    for fold in range(folds.n_folds):
        pred = tmp_path / f"pred_{fold}"
        assert main(["infer", "--checkpoint", str(out / f"fold_{fold}" / "last.pt"), "--manifest", str(manifest_one),
                     "--out", str(pred), "--write-prob", "--no-progress"]) == 0  # fmt: skip
        prob = read_volume(pred / f"{case.case_id}_prob.nii.gz").array
        assert np.allclose(prob, oof_prob, atol=1e-6) == (fold == k), fold


def test_rerun_skips_finished_folds_and_a_changed_config_retrains(data, cv_run, tmp_path):
    cfg, result, out = cv_run
    before = {k: _sha(out / f"fold_{k}" / "last.pt") for k in range(3)}
    done = (out / "fold_0" / FOLD_DONE).read_text()
    again = run_cross_validation(cfg, data, out, progress=False)
    assert {k: _sha(out / f"fold_{k}" / "last.pt") for k in range(3)} == before
    assert (out / "fold_0" / FOLD_DONE).read_text() == done
    assert again.summary["metrics"]["dice"]["mean"] == pytest.approx(result.summary["metrics"]["dice"]["mean"])
    # an inference-only change re-predicts without training
    changed = cfg.model_copy(deep=True)
    changed.inference.threshold = 0.3
    run_cross_validation(changed, data, out, progress=False)
    assert {k: _sha(out / f"fold_{k}" / "last.pt") for k in range(3)} == before


def test_killed_cv_resumes_without_redoing_finished_folds(data, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", data, train={"epochs": 2})
    out = tmp_path / "cv"
    cmd = [sys.executable, "-m", "medseg.cli", "cv", str(config), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (out / "fold_0" / FOLD_DONE).is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # killed after fold 0, somewhere in fold 0's predictions or fold 1
    proc.wait()
    assert (out / "fold_0" / FOLD_DONE).is_file()
    assert not (out / CV_SUMMARY).exists()
    fold0 = _sha(out / "fold_0" / "last.pt")
    done0 = (out / "fold_0" / FOLD_DONE).read_text()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "out-of-fold over 5 case(s), 3 folds" in run.stdout and "(95 % CI over patients 0." in run.stdout
    assert _sha(out / "fold_0" / "last.pt") == fold0 and (out / "fold_0" / FOLD_DONE).read_text() == done0
    assert len(fold_models(out, 3)) == 3
    assert len(list((out / OOF_DIR).glob("*_complete.json"))) == 5


def test_train_fold_cli_writes_shared_folds_and_no_best(data, tmp_path, capsys):
    config = write_config(tmp_path / "cfg.yaml", data)
    out = tmp_path / "study" / "fold_1"
    assert main(["train", str(config), "--fold", "1", "--folds", "3", "--out", str(out), "--no-progress"]) == 0
    assert "fold 1/3" in capsys.readouterr().out
    assert (out / "last.pt").is_file() and not (out / "best.pt").exists()
    folds = read_folds(tmp_path / "study" / FOLDS_FILE)
    assert folds.n_folds == 3
    assert main(["train", str(config), "--fold", "3", "--folds", "3", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "folds are 0..2" in capsys.readouterr().err


def test_model_folder_round_trips_through_infer(data, cv_run, tmp_path, capsys):
    cfg, result, out = cv_run
    models = fold_models(out, 3)
    rule = {"threshold": 0.3, "min_lesion_mm3": 0.0, "min_component_fraction": 0.1, "fill_holes": False,
            "largest_component": False}  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    write_model_folder(tmp_path / "model", models, tmp_path / "config.yaml", out / FOLDS_FILE, rule)
    folder = read_model_folder(tmp_path / "model")
    assert [p.name for p in folder.checkpoints] == ["fold_0.pt", "fold_1.pt", "fold_2.pt"]
    assert (tmp_path / "model" / FOLDS_FILE).is_file() and (tmp_path / "model" / "config.yaml").is_file()
    with pytest.raises(ValueError, match="3 checkpoints need as many distinct names"):
        write_model_folder(tmp_path / "named", models, tmp_path / "config.yaml", out / FOLDS_FILE, rule,
                           names=["a.pt", "a.pt", "b.pt"])  # fmt: skip

    by_model, by_hand = tmp_path / "by_model", tmp_path / "by_hand"
    assert main(["infer", "--model", str(tmp_path / "model"), "--manifest", str(data), "--split", "test",
                 "--out", str(by_model), "--no-progress"]) == 0  # fmt: skip
    hand = ["infer", *[a for m in models for a in ("--checkpoint", str(m))], "--manifest", str(data), "--split", "test",
            "--out", str(by_hand), "--no-progress", *[a for k, v in rule.items() for a in ("--set", f"inference.{k}={json.dumps(v)}")]]  # fmt: skip
    assert main(hand) == 0
    record = json.loads((by_model / "inference.json").read_text())
    assert len(record["checkpoints"]) == 3 and record["inference"]["threshold"] == 0.3
    assert record["inference"]["min_component_fraction"] == 0.1
    test_id = next(c.case_id for c in read_manifest(data) if c.split == "test")
    a = read_volume(by_model / f"{test_id}_mask.nii.gz").array
    b = read_volume(by_hand / f"{test_id}_mask.nii.gz").array
    assert np.array_equal(a, b)
    # the user's --set still wins over the folder's rule
    assert main(["infer", "--model", str(tmp_path / "model"), "--manifest", str(data), "--split", "test",
                 "--out", str(tmp_path / "user"), "--no-progress", "--set", "inference.threshold=0.9"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "user" / "inference.json").read_text())["inference"]["threshold"] == 0.9

    # a replaced checkpoint is refused, naming the file
    capsys.readouterr()
    (tmp_path / "model" / "fold_1.pt").write_bytes((tmp_path / "model" / "fold_0.pt").read_bytes())
    assert main(["infer", "--model", str(tmp_path / "model"), "--manifest", str(data), "--out", str(tmp_path / "bad"),
                 "--no-progress"]) == 2  # fmt: skip
    assert "fold_1.pt: sha256 differs" in capsys.readouterr().err
    assert main(["infer", "--model", str(tmp_path / "nowhere"), "--manifest", str(data), "--out", str(tmp_path / "bad"),
                 "--no-progress"]) == 2  # fmt: skip


def test_torchrun_ranks_train_their_own_folds(data, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    config = write_config(tmp_path / "cfg.yaml", data)
    out = tmp_path / "cv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "medseg.cli", "cv", str(config), "--out", str(out),
           "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fold 0 of 3 (rank 0)" in proc.stderr and "fold 1 of 3 (rank 1)" in proc.stderr
    assert "fold 2 of 3 (rank 0)" in proc.stderr
    assert len(fold_models(out, 3)) == 3
    from medseg.models.checkpoint import load_checkpoint

    for k in range(3):  # each fold trained alone: one rank, no DDP
        assert load_checkpoint(out / f"fold_{k}" / "last.pt")["extra"]["world_size"] == 1
    assert "out-of-fold over 5 case(s), 3 folds" in proc.stdout
