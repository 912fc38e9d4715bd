"""`medseg distill` on phantoms: what each fold's student learns from (never a held-out patient of
its fold, nor a teacher that saw one), the use_student decision, the record, read_student."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import save_tiny_checkpoint, write_tiny_config

from medseg.atomic import sha256_file, write_json
from medseg.auto import distill
from medseg.auto.distill_plan import DistillSettings, split_overrides, student_decision
from medseg.auto.folds import FOLDS_FILE, assign_folds, cv_pool
from medseg.auto.model_folder import checkpoints_by_fold, read_model_folder, read_student, write_model_folder
from medseg.config import LossConfig, load_config
from medseg.data.datasets import SliceDataset
from medseg.data.slices import SliceIndex
from medseg.data.volumes import TrainVolume
from medseg.errors import ConfigError, MedsegError
from medseg.losses import SegmentationLoss
from medseg.manifest import read_manifest
from medseg.outputs import CV_CHOSEN_DIR, CV_TABLE, DISTILL_RECORD, STUDENT_DIR
from medseg.synth import generate_dataset

RULE = {"threshold": 0.5, "min_lesion_mm3": 0.0, "min_component_fraction": 0.0, "fill_holes": False,
        "largest_component": False}  # fmt: skip
CHANNELS = ["flair", "t1"]


def build_model_folder(tmp: Path, n_cases: int = 6, dice: dict[str, float] | None = None) -> tuple[Path, Path, Path]:
    """A tiny model folder as pipelines/auto.yaml leaves it, without training: 3 folds of untrained
    tiny U-Nets (fold 0 with a repeat ``fold_0_r1.pt``), the plan, folds.json and the ensemble's
    out-of-fold table ``cv_chosen/cv_table.csv`` (Dice 0.5 per case unless ``dice`` says).
    Returns (model folder, pool manifest, unlabeled manifest: two more phantoms, labels dropped)."""
    manifest = generate_dataset(tmp / "data", n_cases, shape=(48, 44, 16), seed=2, val_fraction=0.0, test_fraction=0.0)
    cases = read_manifest(manifest)
    assert [c.channels for c in cases][0] == CHANNELS
    folds = assign_folds(cases, 3, seed=0)
    src = tmp / "src"
    src.mkdir()
    write_json(src / FOLDS_FILE, folds.as_dict(cases))
    config = write_tiny_config(src / "config.yaml", manifest, {"train": {"ema_decay": None}})
    names = ["fold_0.pt", "fold_0_r1.pt", "fold_1.pt", "fold_2.pt"]
    checkpoints = [save_tiny_checkpoint(src / f"t{i}.pt", CHANNELS, seed=i) for i in range(len(names))]
    model = tmp / "model"
    write_model_folder(model, checkpoints, config, src / FOLDS_FILE, RULE, names=names)
    fold_of = folds.fold_of_patient()
    table = pd.DataFrame([{"case_id": c.case_id, "patient_id": c.patient_id, "fold": fold_of[c.patient_id],
                           "region": "lesion", "dice": (dice or {}).get(c.case_id, 0.5)} for c in cv_pool(cases)])  # fmt: skip
    (model / CV_CHOSEN_DIR).mkdir()
    pd.concat([table, pd.DataFrame([{"case_id": "mean", "fold": -1, "dice": table["dice"].mean()}])]).to_csv(
        model / CV_CHOSEN_DIR / CV_TABLE, index=False)
    extra = generate_dataset(tmp / "unlabeled", 2, shape=(48, 44, 16), seed=9, val_fraction=0.0, test_fraction=0.0)
    rows = pd.read_csv(extra, dtype=str, keep_default_na=False)
    rows["case_id"] = "u_" + rows["case_id"]
    rows["patient_id"] = "u_" + rows["patient_id"]
    rows["label"] = ""
    rows["split"] = ""
    rows.to_csv(extra, index=False)
    return model, manifest, extra


# --------------------------------------------------------------------------- the bookkeeping, end to end


@pytest.mark.slow  # trains 4 tiny students, predicts and scores 6 held-out phantoms: about 30 s on 2 shared cores
def test_no_held_out_patient_or_teacher_that_saw_one_reaches_its_fold_student(tmp_path, monkeypatch):
    model, manifest, unlabeled = build_model_folder(tmp_path)
    cases = read_manifest(manifest)
    folds = read_model_folder(model)
    fold_assignment = assign_folds(cases, 3, seed=0)

    events: list[tuple] = []  # what really happened, in order: teacher predictions, then the dataset a student trains on
    real_teacher = distill.teacher_probabilities

    def recording_teacher(teacher, volume):
        prob = real_teacher(teacher, volume)
        events.append(("teacher", volume.case_id, sorted(p.name for p in teacher.checkpoints), prob.clone()))
        return prob

    class RecordingDataset(SliceDataset):
        def __init__(self, volumes, *args, **kwargs):
            events.append(("train", [(v.case_id, v.soft_label.clone(), v.label.clone()) for v in volumes]))
            super().__init__(volumes, *args, **kwargs)

    monkeypatch.setattr(distill, "teacher_probabilities", recording_teacher)
    monkeypatch.setattr("medseg.engine.trainer.SliceDataset", RecordingDataset)
    result = distill.run_distillation(model, manifest, unlabeled, ["distill.margin=0.01"], tmp_path / "work",
                                      progress=False)  # fmt: skip

    students, teachers_since = [], []
    for event in events:
        if event[0] == "teacher":
            teachers_since.append(event)
        else:
            students.append((teachers_since, event[1]))
            teachers_since = []
    assert len(students) == 4  # fold_0, fold_1, fold_2, full
    patient = {c.case_id: c.patient_id for c in read_manifest(manifest)}
    for k, (teacher_calls, trained) in enumerate(students[:3]):
        train, held = fold_assignment.split(cases, k)
        held_patients = {c.patient_id for c in held}
        trained_ids = [cid for cid, _, _ in trained]
        assert sorted(trained_ids) == sorted(c.case_id for c in train)
        assert not {patient[cid] for cid in trained_ids} & held_patients  # no held-out image reaches student k
        expected_teachers = ["fold_0.pt", "fold_0_r1.pt"] if k == 0 else [f"fold_{k}.pt"]
        assert {tuple(call[2]) for call in teacher_calls} == {tuple(expected_teachers)}  # only fold k's model(s)
        by_case = {call[1]: call[3] for call in teacher_calls}
        for cid, soft, label in trained:  # the targets are those teachers' probabilities, never a reference label
            prob = by_case[cid]
            assert torch.equal(soft, torch.where(prob < 0.01, torch.zeros(()), prob))
            assert torch.equal(label, (soft >= 0.5).to(torch.uint8))
    teacher_calls, trained = students[3]
    pool_ids = sorted(c.case_id for c in cv_pool(cases))
    assert sorted(cid for cid, _, _ in trained) == sorted([*pool_ids, "u_" + "phantom_000", "u_" + "phantom_001"])
    assert {tuple(call[2]) for call in teacher_calls} == {tuple(sorted(p.name for p in folds.checkpoints))}

    # the record: complete, consistent with what ran, and auditable by ids
    record = json.loads((model / DISTILL_RECORD).read_text())
    assert record == json.loads(json.dumps(result.record))
    assert [s["student"] for s in record["students"]] == ["fold_0", "fold_1", "fold_2", "full"]
    for k, entry in enumerate(record["students"][:3]):
        train, held = fold_assignment.split(cases, k)
        assert entry["trained_on_patients"] == sorted({c.patient_id for c in train})
        assert entry["held_out_patients"] == sorted({c.patient_id for c in held})
        assert entry["epochs"] == 1 and entry["n_cases"] == len(held)
    assert record["student"]["sha256"] == sha256_file(model / STUDENT_DIR / "last.pt")
    assert record["student"]["trained_on_patients"] == sorted({*map(patient.get, pool_ids), "u_patient_000", "u_patient_001"})
    per_case = pd.DataFrame(record["per_case"])
    assert sorted(per_case["case_id"]) == pool_ids and per_case["student_dice"].notna().all()
    check = record["check"]
    assert check["margin"] == 0.01 and check["ensemble_mean_dice"] == pytest.approx(0.5)
    assert check["students_mean_dice"] == pytest.approx(per_case["student_dice"].mean())
    assert check["paired_difference"]["mean"] == pytest.approx((per_case["student_dice"] - 0.5).mean())
    assert record["use_student"] is (check["students_mean_dice"] >= 0.5 - 0.01)
    assert set(record) >= {"format", "use_student", "check", "students", "per_case", "student", "settings", "failures"}
    student = read_student(read_model_folder(model))
    assert (student is not None) is record["use_student"]


# --------------------------------------------------------------------------- pure parts


def test_use_student_decision_on_constructed_numbers():
    assert student_decision(0.800, 0.804, 0.005)[0] is True  # 0.004 below: inside the margin
    assert student_decision(0.799, 0.804, 0.005)[0] is True  # exactly the margin below
    assert student_decision(0.7989, 0.804, 0.005)[0] is False
    assert student_decision(0.810, 0.804, 0.0)[0] is True
    assert student_decision(0.803, 0.804, 0.0)[0] is False
    assert student_decision(0.9, 0.8, 0.005, n_failed=1) == (False, "1 held-out case(s) could not be predicted or "
                                                                    "scored by their fold's student")  # fmt: skip
    assert student_decision(math.nan, 0.8, 0.005)[0] is False

    # the comparison on constructed cases: two patients, one with two scans
    per_case = pd.DataFrame({"case_id": ["a1", "a2", "b", "c"], "patient_id": ["a", "a", "b", "c"], "fold": [0, 0, 1, 2],
                             "student_dice": [0.70, 0.80, 0.90, 0.60], "ensemble_dice": [0.72, 0.80, 0.88, 0.70]})  # fmt: skip
    check = distill.compare(per_case, 0.005, 0)
    assert check["students_mean_dice"] == pytest.approx(0.75) and check["ensemble_mean_dice"] == pytest.approx(0.775)
    assert check["paired_difference"]["mean"] == pytest.approx(-0.025)
    assert check["use_student"] is False  # 0.75 < 0.775 - 0.005
    assert distill.compare(per_case, 0.03, 0)["use_student"] is True
    assert (check["paired_difference"]["patients_better"], check["paired_difference"]["patients_worse"]) == (1, 2)
    assert [f["fold"] for f in check["per_fold"]] == [0, 1, 2] and check["per_fold"][0]["student_dice"] == pytest.approx(0.75)


def test_settings_and_overrides_are_checked():
    settings, student = split_overrides(["distill.margin=0.02", "model.width=0.0625", "train.epochs=3"])
    assert settings == ["margin=0.02"] and student == ["model.width=0.0625", "train.epochs=3"]
    assert load_config(None, settings, DistillSettings).margin == 0.02
    assert DistillSettings().margin == 0.005
    with pytest.raises(ConfigError, match="preprocess.context_slices=2"):
        split_overrides(["preprocess.context_slices=2"])
    with pytest.raises(ConfigError, match="margn"):
        load_config(None, ["margn=0.1"], DistillSettings)


def test_checkpoints_are_grouped_by_the_fold_they_did_not_see(tmp_path):
    model, _, _ = build_model_folder(tmp_path, n_cases=3)
    groups = checkpoints_by_fold(read_model_folder(model))
    assert {k: [p.name for p in v] for k, v in groups.items()} == {0: ["fold_0.pt", "fold_0_r1.pt"], 1: ["fold_1.pt"],
                                                                   2: ["fold_2.pt"]}  # fmt: skip
    folder = read_model_folder(model)
    renamed = type(folder)(folder.path, [folder.path / "unet_fold_1_r2.pt", folder.path / "best.pt"], {}, {})
    with pytest.raises(MedsegError, match="best.pt: the name says no cross-validation fold"):
        checkpoints_by_fold(renamed)


def accepted_student(tmp: Path) -> tuple[Path, Path, Path, dict]:
    """A tiny model folder whose distill.json accepts a (tiny, untrained) student: (folder, pool
    manifest, student checkpoint, record)."""
    from medseg.auto.model_folder import fold_sha256

    folder, manifest, _ = build_model_folder(tmp, n_cases=3)
    (folder / STUDENT_DIR).mkdir()
    checkpoint = save_tiny_checkpoint(folder / STUDENT_DIR / "last.pt", CHANNELS, seed=11)
    (folder / STUDENT_DIR / "config.yaml").write_text(yaml.safe_dump({}))
    record = {"format": "medseg-distill", "use_student": True,
              "student": {"sha256": sha256_file(checkpoint), "teacher_sha256": fold_sha256(read_model_folder(folder))}}  # fmt: skip
    write_json(folder / DISTILL_RECORD, record)
    return folder, manifest, checkpoint, record


def test_read_student_returns_it_only_when_chosen_and_unchanged(tmp_path):
    folder, _, checkpoint, record = accepted_student(tmp_path)
    student = read_student(read_model_folder(folder))
    assert student is not None and student.checkpoint == checkpoint and student.record["use_student"] is True

    write_json(folder / DISTILL_RECORD, {**record, "use_student": False})
    assert read_student(read_model_folder(folder)) is None  # lost the out-of-fold check
    write_json(folder / DISTILL_RECORD, {**record, "student": {**record["student"], "teacher_sha256": {"fold_0.pt": "0" * 64}}})
    with pytest.raises(MedsegError, match="other fold checkpoints"):
        read_student(read_model_folder(folder))  # distilled from folds this folder no longer holds
    write_json(folder / DISTILL_RECORD, record)
    data = bytearray(checkpoint.read_bytes())
    data[len(data) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(MedsegError, match="sha256 differs"):
        read_student(read_model_folder(folder))
    checkpoint.unlink()
    with pytest.raises(MedsegError, match="not found"):
        read_student(read_model_folder(folder))
    write_json(folder / DISTILL_RECORD, {"format": "other", "use_student": True})
    with pytest.raises(MedsegError, match="not a medseg distillation record"):
        read_student(read_model_folder(folder))
    (folder / DISTILL_RECORD).unlink()
    assert read_student(read_model_folder(folder)) is None  # no record: no student


def test_infer_runs_the_accepted_student_unless_told_off(tmp_path):
    """``medseg infer --model`` (and the pipeline's infer stage, through the same loader) runs the
    student alone when distill accepted it, the folds with ``inference.student=off``; the
    folder's post-processing rule applies either way and the record names what ran."""
    from medseg.cli import main
    from medseg.inference.bundle import load_model_folder

    folder, manifest, checkpoint, _ = accepted_student(tmp_path)
    for student, out in (("auto", tmp_path / "with_student"), ("off", tmp_path / "folds")):  # off: YAML false
        assert main(["infer", "--model", str(folder), "--manifest", str(manifest), "--out", str(out),
                     "--set", f"inference.student={student}", "--no-progress"]) == 0  # fmt: skip
        record = json.loads((out / "inference.json").read_text())
        ran = [Path(entry["file"]).name for entry in record["model"]["checkpoints"]]
        expected = ["last.pt"] if student == "auto" else [p.name for p in read_model_folder(folder).checkpoints]
        assert ran == expected, (student, ran)
        assert record["inference"]["threshold"] == RULE["threshold"]
        assert record["inference"]["student"] == ("auto" if student == "auto" else False)
    (folder / DISTILL_RECORD).unlink()
    with pytest.raises(MedsegError, match="no student that medseg distill accepted"):
        load_model_folder(folder, {"student": True})

# --------------------------------------------------------------------------- the soft-target path


def test_soft_targets_reach_the_loss_unchanged():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((2, 4, 8, 8), dtype=np.float32))
    soft = torch.from_numpy(rng.random((4, 8, 8), dtype=np.float32))
    volume = TrainVolume("x", image, (soft >= 0.5).to(torch.uint8), (1.0, 1.0, 1.0), soft_label=soft)
    dataset = SliceDataset([volume], SliceIndex.from_volumes([volume]), context=1)
    sample = dataset[2]
    assert torch.equal(sample["label"], soft[2][None]) and sample["label"].dtype == torch.float32
    sample["label"].fill_(7.0)
    assert soft.max() <= 1.0  # the sample is a copy: nothing writes back into the volume

    # Dice + BCE on a soft target, computed by hand: BCE with logits, soft batch Dice of the sigmoid
    logits = torch.from_numpy(rng.normal(size=(2, 1, 8, 8)).astype(np.float32))
    target = torch.from_numpy(rng.random((2, 1, 8, 8), dtype=np.float32))
    p = torch.sigmoid(logits)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    inter, total = (p * target).sum(), p.sum() + target.sum()
    dice = 1 - (2 * inter + 1e-5) / (total + 1e-5)
    loss = SegmentationLoss(1, LossConfig(batch_dice=True))(logits, target)
    assert loss.item() == pytest.approx((dice + bce).item(), rel=1e-5)
