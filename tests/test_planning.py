"""`medseg plan`: the dataset fingerprint and the rules that turn it into a config.

Expectations are computed here from the arrays the tests write (numpy percentiles, box sizes,
the documented formulas), never by re-running medseg's planner code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medseg.auto.fingerprint import compute_fingerprint
from medseg.auto.planning import plan_dataset, plan_from_fingerprint, round_patch
from medseg.cli import main
from medseg.config import Config, LabelConfig, load_config
from medseg.errors import ConfigError, ManifestError
from medseg.manifest import Case, read_manifest, write_manifest

MARGIN = 8  # preprocess.crop_margin default: the training slice is the foreground box + 2 x 8 px


def stored(ras: np.ndarray, spacing: tuple[float, float, float], kind: str) -> tuple[np.ndarray, np.ndarray]:
    """File array and affine that store the (R, A, S) array ``ras`` in a non-RAS orientation.

    ``lps``: first two axes flipped; ``perm``: file axes (A, S, R), so the thick R axis is the
    last file axis."""
    s_r, s_a, s_s = spacing
    affine = np.eye(4)
    affine[:3, 3] = (-40.3, 12.7, -25.1)
    if kind == "lps":
        affine[:3, :3] = np.diag([-s_r, -s_a, s_s])
        return np.ascontiguousarray(ras[::-1, ::-1, :]), affine
    if kind == "perm":
        affine[:3, :3] = [[0, 0, s_r], [s_a, 0, 0], [0, s_s, 0]]
        return np.ascontiguousarray(ras.transpose(1, 2, 0)), affine
    raise ValueError(kind)


def write_case(folder: Path, case_id: str, images: dict[str, np.ndarray], label: np.ndarray,
               spacing: tuple[float, float, float], modality: str, kind: str = "lps", split: str = "train",
               patient: str | None = None) -> Case:
    """Write RAS arrays as NIfTI (stored per ``kind``) and return the manifest row."""
    paths = {}
    for name, ras in images.items():
        data, affine = stored(ras, spacing, kind)
        paths[name] = folder / f"{case_id}_{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(paths[name]))
    data, affine = stored(label, spacing, kind)
    label_path = folder / f"{case_id}_label.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(label_path))
    return Case(case_id, patient or f"patient_{case_id}", modality, paths, label_path, split)


def ct_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CT (R, A, S): air -1000, a body box [10:110, 10:160] at 0 HU, one 10x10x2 lesion of
    uniform integer HU in 40..80. Returns (image, label, lesion HU values)."""
    shape = (120, 170, 6)
    image = np.full(shape, -1000, np.int16)
    image[10:110, 10:160, :] = 0
    label = np.zeros(shape, np.uint8)
    label[40:50, 50:60, 2:4] = 1
    values = rng.integers(40, 81, size=(10, 10, 2)).astype(np.int16)
    image[40:50, 50:60, 2:4] = values
    return image, label, values.ravel()


@pytest.fixture
def ct_manifest(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """Three CT patients, 0.7 x 0.7 x 5 mm, stored LPS; returns (manifest, all lesion HU)."""
    rng = np.random.default_rng(7)
    cases, values = [], []
    for i in range(3):
        image, label, hu = ct_case(rng)
        cases.append(write_case(tmp_path, f"ct{i}", {"ct": image}, label, (0.7, 0.7, 5.0), "CT"))
        values.append(hu)
    return write_manifest(cases, tmp_path / "ct.csv"), np.concatenate(values)


def mr_volume(shape: tuple[int, int, int], box: tuple[slice, ...], lesion: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Skull-stripped-like MR (R, A, S): 0 outside ``box``, 100 inside, 300 in the lesion."""
    image = np.zeros(shape, np.int16)
    image[box] = 100
    image[lesion] = 300
    label = np.zeros(shape, np.uint8)
    label[lesion] = 2
    return image, label


def cuda_batch(patch: list[int]) -> int:
    ratio = 160 * 192 / (patch[0] * patch[1])
    return min(max(2 ** round(math.log2(32 * ratio)), 4), 64)


def test_ct_thick_slices_plan(ct_manifest):
    manifest, hu = ct_manifest
    fingerprint = compute_fingerprint(read_manifest(manifest), LabelConfig(), progress=False)
    assert fingerprint["modality"] == "CT" and fingerprint["n_cases"] == 3 and fingerprint["n_patients"] == 3
    assert fingerprint["spacing_median"] == pytest.approx([0.7, 0.7, 5.0])
    assert fingerprint["shape_median"] == [120, 170, 6]
    assert fingerprint["cropped_extent_median"] == [100, 150, 6]
    assert fingerprint["n_lesions"] == 3
    assert fingerprint["lesion_volume_mm3"]["p50"] == pytest.approx(200 * 0.7 * 0.7 * 5.0)
    assert fingerprint["lesion_slice_fraction_median"] == pytest.approx(2 / 6)
    assert fingerprint["label_values"] == [0, 1]
    lo, hi = np.percentile(hu, [0.5, 99.5])
    assert fingerprint["intensity"]["ct"]["lesion"]["p0.5"] == pytest.approx(lo)
    assert fingerprint["intensity"]["ct"]["lesion"]["mean"] == pytest.approx(hu.mean())
    json.dumps(fingerprint)  # JSON-safe

    plan = plan_from_fingerprint(fingerprint, str(manifest), "cpu", cpu_bf16=True)
    cfg = plan.config
    assert cfg.preprocess.slice_axis == cfg.stats.axis == cfg.evaluation.slice_axis == "axial"
    assert cfg.preprocess.context_slices == 1  # round(2 mm / 5 mm) = 0 -> at least 1
    assert cfg.preprocess.spacing_inplane is None
    assert cfg.model.in_channels == 3
    centre = (lo + hi) / 2  # a ~40 HU wide lesion window, widened to 100 HU about its centre
    assert cfg.preprocess.ct_window == pytest.approx((centre - 50, centre + 50), abs=0.06)
    assert cfg.preprocess.ct_body_hu == -500
    patch = [round((100 + 2 * MARGIN) / 32) * 32, round((150 + 2 * MARGIN) / 32) * 32]
    assert list(cfg.train.patch_size) == patch == [128, 160]
    epochs = math.floor(20 * 60 * 25 * (160 * 192) / (patch[0] * patch[1]) / 1600)
    assert cfg.train.epochs == epochs and cfg.train.max_minutes == 25
    fp32 = plan_from_fingerprint(fingerprint, str(manifest), "cpu", cpu_bf16=False).config  # an AVX2-only CPU
    assert fp32.train.epochs == math.floor(20 * 60 * 8 * (160 * 192) / (patch[0] * patch[1]) / 1600)
    assert cfg.train.batch_size == 8 and cfg.train.num_workers == 1 and cfg.train.threads == 1
    assert any("(assumed, cpu, bf16)" in r for r in plan.rules if r.startswith("train.epochs"))
    measured = plan_from_fingerprint(fingerprint, str(manifest), "cpu", throughput=7.3)  # slices/s at this patch
    assert measured.config.train.epochs == math.floor(20 * 60 * 7.3 / 1600) == 5
    assert any("7.3 slices/s (measured on this machine: 8 x 128x160" in r for r in measured.rules)
    assert measured.config.model_dump(exclude={"train": {"epochs"}}) == cfg.model_dump(exclude={"train": {"epochs"}})
    with pytest.raises(ConfigError, match="throughput must be positive"):
        plan_from_fingerprint(fingerprint, str(manifest), "cpu", throughput=0.0)
    assert cfg.inference.min_lesion_mm3 == 200  # half of 245 mm3 -> 1 significant digit
    assert cfg.cv.folds == 3
    assert cfg.data.labels.allowed_values == [0, 1] and cfg.data.labels.foreground == "nonzero"
    assert cfg.train.augment.rotate_deg == 30  # < 50 patients: the strong set
    assert any(r.startswith("preprocess.context_slices = 1:") and "5 mm" in r for r in plan.rules)

    cuda = plan_from_fingerprint(fingerprint, str(manifest), "cuda", minutes_per_fold=1)
    assert cuda.config.train.batch_size == cuda_batch(patch) == 64  # 32 x 1.5 = 48 -> 2 ** round(5.58)
    assert cuda.config.train.epochs == math.floor(60 * 600 * (160 * 192) / (128 * 160) / 1600)
    assert cuda.config.train.num_workers == 8 and cuda.config.train.threads is None
    assert cfg.cv.repeats == fp32.cv.repeats == cuda.config.cv.repeats == 1


@pytest.mark.parametrize(("minutes", "n_candidates", "repeats"), [(1, 0, 1), (5, 0, 1), (8, 2, 1), (20, 2, 3)])
def test_a_budget_beyond_one_models_epochs_buys_candidates_then_repeats(ct_manifest, minutes, n_candidates, repeats):
    """At 900 slices/s a fold's budget holds 33.75 epochs a minute; one model trains at most 100.
    Two full models per fold buy the candidates (and mirroring tried); more buys seeds of each."""
    manifest, _ = ct_manifest
    fingerprint = compute_fingerprint(read_manifest(manifest), LabelConfig(), progress=False)
    plan = plan_from_fingerprint(fingerprint, str(manifest), "cuda", minutes_per_fold=minutes, throughput=900.0)
    budget = math.floor(minutes * 60 * 900 / 1600)
    assert plan.config.train.epochs == min(max(budget, 3), 100)
    assert len(plan.config.cv.candidates) == n_candidates and plan.config.cv.try_tta == bool(n_candidates)
    per_fold = 100 * max(n_candidates, 1)
    assert plan.config.cv.repeats == repeats == min(max(budget // per_fold, 1), 3)
    assert any(r.startswith(f"cv.repeats = {repeats}: the budget holds {budget} epochs per fold") for r in plan.rules)
    assert any(r.startswith("cv.candidates = " + ("['deeplabv3plus', 'unet_inception']" if n_candidates else "none"))
               for r in plan.rules)


def test_thick_r_axis_gives_sagittal_slices(tmp_path):
    cases = []
    for i in range(2):
        image, label = mr_volume((8, 60, 70), (slice(None), slice(5, 55), slice(10, 60)),
                                 (slice(2, 5), slice(20, 30), slice(30, 40)))
        cases.append(write_case(tmp_path, f"mr{i}", {"flair": image}, label, (5.0, 0.8, 0.8), "MR", kind="perm"))
    fingerprint = compute_fingerprint(cases, LabelConfig(), progress=False)
    assert fingerprint["spacing_median"] == pytest.approx([5.0, 0.8, 0.8])
    assert fingerprint["cropped_extent_median"] == [8, 50, 50]
    cfg = plan_from_fingerprint(fingerprint, "m.csv", "cpu").config
    assert cfg.preprocess.slice_axis == cfg.stats.axis == cfg.evaluation.slice_axis == "sagittal"
    assert cfg.preprocess.context_slices == 1
    assert list(cfg.train.patch_size) == [64, 64]  # (50 + 16) px -> 64 on A and S
    assert cfg.data.labels.allowed_values == [0, 2]


def test_mixed_inplane_spacing_resamples_to_the_median(tmp_path):
    cases = []
    for i, s in enumerate((0.5, 0.8, 1.0)):
        image, label = mr_volume((130, 130, 10), (slice(10, 110), slice(10, 110), slice(None)),
                                 (slice(40, 50), slice(40, 50), slice(4, 6)))
        cases.append(write_case(tmp_path, f"mr{i}", {"t1": image}, label, (s, s, 3.0), "MR"))
    fingerprint = compute_fingerprint(cases, LabelConfig(), progress=False)
    plan = plan_from_fingerprint(fingerprint, "m.csv", "cpu")
    assert plan.config.preprocess.spacing_inplane == pytest.approx((0.8, 0.8))
    # 100 px boxes at 0.5 / 0.8 / 1.0 mm are 62.5 / 100 / 125 px at 0.8 mm; + 16 -> median 116 -> 128
    # (the 130 px slices, 81 / 130 / 162 px at 0.8 mm, do not cut them)
    assert list(plan.config.train.patch_size) == [128, 128]
    assert plan.config.preprocess.context_slices == 1  # round(2 / 3)
    assert any("spacing_inplane = [0.8, 0.8]" in r for r in plan.rules)


def test_mr_1mm_gets_two_context_slices(tmp_path):
    cases = []
    for i in range(2):
        flair, label = mr_volume((40, 40, 20), (slice(4, 36), slice(4, 36), slice(2, 18)),
                                 (slice(10, 14), slice(10, 14), slice(8, 11)))
        cases.append(write_case(tmp_path, f"mr{i}", {"flair": flair, "t2": flair // 2}, label, (1.0, 1.0, 1.0), "MR"))
    fingerprint = compute_fingerprint(cases, LabelConfig(), progress=False)
    cfg = plan_from_fingerprint(fingerprint, "m.csv", "cpu").config
    assert cfg.preprocess.slice_axis == "axial" and cfg.preprocess.context_slices == 2
    assert cfg.model.in_channels == 2 * 5
    assert cfg.preprocess.mr_percentiles == (0.5, 99.5)
    assert cfg.preprocess.ct_window == Config().preprocess.ct_window  # untouched for MR
    assert cfg.cv.folds == 2
    # lesion 4x4x3 = 48 mm3 -> half = 24 -> 1 significant digit 20
    assert cfg.inference.min_lesion_mm3 == 20


def test_patch_rounding():
    assert round_patch([100, 150], "cpu") == [96, 160]
    assert round_patch([10, 1000], "cpu") == [64, 256]
    assert round_patch([10, 1000], "cuda") == [64, 512]


def test_test_cases_are_never_read(tmp_path, ct_manifest):
    manifest, _ = ct_manifest
    cases = read_manifest(manifest)
    garbage = tmp_path / "held_out_ct.nii.gz"
    garbage.write_bytes(b"not a volume")  # reading it would raise InputFileError
    cases.append(Case("held_out", "patient_x", "CT", {"ct": garbage}, garbage, "test"))
    all_cases = write_manifest(cases, tmp_path / "with_test.csv")
    fingerprint = compute_fingerprint(read_manifest(all_cases), LabelConfig(), progress=False)
    assert [row["case_id"] for row in fingerprint["cases"]] == ["ct0", "ct1", "ct2"]
    plan = plan_dataset(all_cases, tmp_path / "plan" / "PLAN.yaml", device="cpu", progress=False, measure=False)
    assert plan.fingerprint["n_cases"] == 3 and plan.config.cv.folds == 3


def test_written_plan_loads_as_the_same_config(tmp_path, ct_manifest):
    manifest, _ = ct_manifest
    out = tmp_path / "plans" / "PLAN.yaml"
    plan = plan_dataset(manifest, out, device="cpu", minutes_per_fold=5, progress=False)  # measured epochs
    assert load_config(out) == plan.config
    text = out.read_text()
    assert all(f"#   {rule}" in text for rule in plan.rules)
    assert json.loads((out.parent / "fingerprint.json").read_text()) == plan.fingerprint
    assert plan.config.data.manifest == str(manifest)
    assert plan.config.train.max_minutes == 5 * 1.25
    epochs_rule = next(r for r in plan.rules if r.startswith("train.epochs"))
    assert "measured on this machine: 8 x 128x160 steps of the planned model, batches through the data" in epochs_rule
    assert plan.config.train.threads in (1, None)
    shown = float(epochs_rule.split(" x ")[1].split(" slices/s")[0])  # 4 significant digits
    possible = {min(max(math.floor(5 * 60 * shown * f / 1600), 3), 100) for f in (1 - 5e-4, 1 + 5e-4)}
    assert plan.config.train.epochs in possible


def test_a_failed_measurement_falls_back_to_the_assumed_speed(tmp_path, ct_manifest, monkeypatch):
    import medseg.engine.throughput

    def out_of_memory(cfg, cases, device):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(medseg.engine.throughput, "measure_pipeline_throughput", out_of_memory)
    manifest, _ = ct_manifest
    plan = plan_dataset(manifest, tmp_path / "PLAN.yaml", device="cpu", progress=False, cpu_bf16=False)
    assert plan.config.train.epochs == math.floor(20 * 60 * 8 * (160 * 192) / (128 * 160) / 1600)
    assert "training throughput not measured (RuntimeError: CUDA out of memory)" in plan.rules[-1]
    assert plan.rules[-1] in (tmp_path / "PLAN.yaml").read_text()


@pytest.mark.parametrize(("cores", "all_cores", "threads"), [(4, 20.0, None), (4, 10.5, 1), (1, 20.0, 1)])
def test_cpu_threads_and_epochs_follow_the_pipeline_measurement(tmp_path, ct_manifest, monkeypatch, cores, all_cores,
                                                                threads):
    import torch

    import medseg.engine.throughput

    measured = []

    def pipeline_speed(cfg, cases, device):
        measured.append((cfg.train.threads, [c.case_id for c in cases.train], cases.val, device))
        return 10.0 if cfg.train.threads == 1 else all_cores

    monkeypatch.setattr(medseg.engine.throughput, "measure_pipeline_throughput", pipeline_speed)
    monkeypatch.setattr(torch, "get_num_threads", lambda: cores)
    manifest, _ = ct_manifest
    plan = plan_dataset(manifest, tmp_path / "PLAN.yaml", device="cpu", progress=False)
    pool = ["ct0", "ct1", "ct2"]  # MEASURE_CASES of the pool, nothing held out
    assert measured == [(1, pool, [], "cpu"), (None, pool, [], "cpu")][: 2 if cores > 1 else 1]
    assert plan.config.train.threads == threads
    speed = all_cores if threads is None else 10.0
    assert plan.config.train.epochs == math.floor(20 * 60 * speed / 1600)
    epochs_rule = next(r for r in plan.rules if r.startswith("train.epochs"))
    assert "batches through the data pipeline" in epochs_rule
    assert ("1 thread" in epochs_rule) == (threads == 1)
    threads_rule = next(r for r in plan.rules if r.startswith("train.device"))
    if cores > 1:
        assert f"{all_cores:g} slices/s with all 4 threads vs 10 with 1 (measured)" in threads_rule
    assert f"threads = {threads or 'null'}" in threads_rule


def test_cli_plan_writes_plan_and_fingerprint(tmp_path, ct_manifest, capsys):
    manifest, _ = ct_manifest
    out = tmp_path / "cli" / "PLAN.yaml"
    assert main(["plan", str(manifest), "--out", str(out), "--device", "cpu", "--no-measure", "--no-progress"]) == 0
    assert out.is_file() and (out.parent / "fingerprint.json").is_file()
    printed = capsys.readouterr().out
    assert "preprocess.context_slices = 1" in printed and str(out) in printed
    assert "slices/s (assumed, cpu" in printed  # --no-measure: the device class's constant


def test_errors_name_the_manifest(tmp_path, capsys):
    rng = np.random.default_rng(0)
    image, label, _ = ct_case(rng)
    one = write_manifest([write_case(tmp_path, "a", {"ct": image}, label, (0.7, 0.7, 5.0), "CT")], tmp_path / "one.csv")
    with pytest.raises(ConfigError, match=r"one\.csv.*1 patient"):
        plan_dataset(one, tmp_path / "p1.yaml", progress=False, measure=False)
    only_test = write_manifest(
        [write_case(tmp_path, "b", {"ct": image}, label, (0.7, 0.7, 5.0), "CT", split="test")], tmp_path / "test_only.csv"
    )
    with pytest.raises(ManifestError, match=r"test_only\.csv"):
        plan_dataset(only_test, tmp_path / "p2.yaml", progress=False, measure=False)
    assert main(["plan", str(only_test), "--out", str(tmp_path / "p3.yaml"), "--device", "cpu"]) == 2
    assert "test_only.csv" in capsys.readouterr().err


@pytest.mark.real_data
@pytest.mark.slow
def test_radiomics_nrrd_plans(tmp_path, requires_nrrd):
    def row(name: str, modality: str, patient: str) -> Case:
        return Case(f"{name}_{patient}", patient, modality, {"image": requires_nrrd / f"{name}_image.nrrd"},
                    requires_nrrd / f"{name}_label.nrrd", "train")

    # lung1: CT 0.57 x 0.57 x 5 mm, one nodule of 837 voxels on 3 slices
    lung = write_manifest([row("lung1", "CT", "p1")], tmp_path / "lung.csv")
    with pytest.raises(ConfigError, match="1 patient"):
        plan_dataset(lung, tmp_path / "lung.yaml", progress=False, measure=False)
    assert not (tmp_path / "fingerprint.json").exists() and not (tmp_path / "lung.yaml").exists()
    twice = write_manifest([row("lung1", "CT", "p1"), row("lung1", "CT", "p2")], tmp_path / "lung2.csv")
    plan = plan_dataset(twice, tmp_path / "lung" / "PLAN.yaml", device="cpu", progress=False, measure=False)
    case = plan.fingerprint["cases"][0]
    assert case["spacing"] == pytest.approx([0.5703125, 0.5703125, 5.0])
    assert case["n_lesions"] == 1 and case["lesion_volumes_mm3"][0] == pytest.approx(837 * 0.5703125**2 * 5.0)
    assert case["lesion_slice_fraction"] == pytest.approx(3 / 48)
    cfg = plan.config
    assert cfg.preprocess.slice_axis == "axial" and cfg.preprocess.context_slices == 1
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(requires_nrrd / "lung1_image.nrrd")))
    nodule = image[sitk.GetArrayFromImage(sitk.ReadImage(str(requires_nrrd / "lung1_label.nrrd"))) > 0]
    low, high = np.percentile(np.concatenate([nodule, nodule]), [0.5, 99.5])  # the nodule, from both rows
    if high - low < 100:
        low, high = (low + high) / 2 - 50, (low + high) / 2 + 50
    assert cfg.preprocess.ct_window == pytest.approx((low, high), abs=0.06)

    # brain1 + brain2: MR 0.78 x 0.78 x 6.5 mm
    brain = write_manifest([row("brain1", "MR", "b1"), row("brain2", "MR", "b2")], tmp_path / "brain.csv")
    plan = plan_dataset(brain, tmp_path / "brain" / "PLAN.yaml", device="cpu", progress=False, cpu_bf16=True,
                        measure=False)
    cfg = plan.config
    assert cfg.preprocess.slice_axis == "axial" and cfg.preprocess.context_slices == 1
    assert cfg.preprocess.spacing_inplane is None and cfg.model.in_channels == 3
    assert cfg.cv.folds == 2
    assert load_config(tmp_path / "brain" / "PLAN.yaml") == cfg


@pytest.mark.slow
@pytest.mark.real_data
def test_brats_plan_reproduces_the_hand_written_recipe(tmp_path, requires_brats):
    """Without hand edits, the 12 BraTS cases plan to the choices of configs/brats_unet_inception.yaml
    (the recipe tuned by hand): same preprocessing and training, except what the plan derives on
    purpose (epochs from the time budget, the lesion-size floor the CV stage refines) and the
    network: configs/brats_deeplabv3plus.yaml's DeepLabv3+, which beat the hand-tuned U-Net in
    5-fold CV at the same CPU budget (docs/benchmarks.md)."""
    from medseg.importers import import_brats
    from medseg.manifest import assign_patient_splits

    manifest = write_manifest(assign_patient_splits(import_brats(requires_brats), val_fraction=0.0), tmp_path / "b.csv")
    plan = plan_dataset(manifest, tmp_path / "plan.yaml", device="cpu", progress=False, cpu_bf16=True, measure=False)
    hand = load_config(Path(__file__).resolve().parents[1] / "configs" / "brats_unet_inception.yaml")
    cfg = plan.config
    assert cfg.preprocess == hand.preprocess
    deeplab = load_config(Path(__file__).resolve().parents[1] / "configs" / "brats_deeplabv3plus.yaml").model
    assert cfg.model.in_channels == hand.model.in_channels == 15 and cfg.model.dropout == 0.1  # the arch default
    assert cfg.model.model_copy(update={"in_channels": deeplab.in_channels, "dropout": None}) == deeplab
    assert cfg.data.labels == hand.data.labels
    same = ("seed", "samples_per_epoch", "patch_size", "lesion_fraction", "num_workers", "threads", "amp",
            "ema_decay", "optimizer", "schedule", "loss", "augment")  # fmt: skip
    assert {k: getattr(cfg.train, k) for k in same} == {k: getattr(hand.train, k) for k in same}
    assert cfg.train.patience is None and cfg.cv.folds == 5  # nothing is chosen on a held-out fold
    assert hand.train.batch_size == 16 and cfg.train.batch_size == 8  # CPU: twice the optimiser steps, same cost
    assert cfg.train.epochs == 18  # 20 min at 25 slices/s (assumed, bf16 CPU)
    fp32 = plan_from_fingerprint(plan.fingerprint, str(manifest), "cpu", cpu_bf16=False).config  # same fingerprint
    assert fp32.train.epochs == 6 and fp32.preprocess == hand.preprocess  # an AVX2-only CPU: fewer epochs, same grid


@pytest.mark.parametrize("volumes,objective", [
    ([[50000.0, 2.0, 1.0]] * 3, "dice"),                       # a glioma and its 1-voxel specks
    ([[800.0, 40.0, 30.0, 12.0]] * 2 + [[900.0]], "both"),      # metastases: median 4 lesions >= 10 mm3
    ([], "dice"),
])
def test_postprocess_objective_from_lesions_per_case(volumes, objective):
    from medseg.auto.plan_rules import determine_postprocess_objective as postprocess_objective

    fingerprint = {"cases": [{"lesion_volumes_mm3": v} for v in volumes]}
    chosen, reason = postprocess_objective(fingerprint, 10.0)
    assert chosen == objective and "per case" in reason or not volumes
