"""Wrong input that used to be accepted without a word (issue 32): an image given as the label,
a blank scan, fractions outside [0, 1). Each is one line naming the file (or argument) and the
problem; the label checks can be switched off where a user may mean it."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
from conftest import write_tiny_config

from .conftest import (
    assert_refused,
    assert_some_failed,
    case_rows,
    leftovers,
    read_failures,
    run_cli,
    write_rows,
)


def _image_as_label(tmp_path: Path, dataset) -> tuple[Path, np.ndarray]:
    """The manifest with case phantom_000's T1 (int16 MR, background 0) given as its label."""
    t1 = dataset[0].images["t1"]
    rows = case_rows(dataset)
    rows[0]["label"] = str(t1)
    return write_rows(tmp_path / "m.csv", rows), np.asarray(nib.load(str(t1)).dataobj)


def _stats_done(out: Path) -> list[str]:
    with (out / "case_stats.csv").open(newline="") as fh:
        return [row["case_id"] for row in csv.DictReader(fh)]


def test_an_image_given_as_the_label_is_refused_by_stats(tmp_path, dataset):
    manifest, t1 = _image_as_label(tmp_path, dataset)
    out = tmp_path / "out"
    proc = run_cli("stats", manifest, "--out", out, "--no-progress")
    assert_some_failed(proc)
    failures = read_failures(out)
    assert list(failures) == ["phantom_000"]
    n_values = len(np.unique(t1))
    assert n_values > 32
    message = failures["phantom_000"]
    assert f"{dataset[0].images['t1']}: label has {n_values} distinct values" in message
    assert "looks like an image, not a label" in message and "data.labels.max_distinct_values" in message
    assert _stats_done(out) == ["phantom_001", "phantom_002"]
    assert not leftovers(out)


def test_a_label_covering_most_of_the_volume_is_refused(tmp_path, dataset):
    manifest, t1 = _image_as_label(tmp_path, dataset)
    out = tmp_path / "out"
    proc = run_cli("stats", manifest, "--out", out, "--no-progress", "--set", "data.labels.max_distinct_values=null")
    assert_some_failed(proc)
    message = read_failures(out)["phantom_000"]
    fraction = np.count_nonzero(t1 > 0) / t1.size  # "nonzero": every value > 0 is lesion
    assert fraction > 0.99
    assert f"{dataset[0].images['t1']}: label foreground covers {fraction:.2%} of the volume" in message
    assert "data.labels.max_foreground_fraction = 0.5" in message
    assert _stats_done(out) == ["phantom_001", "phantom_002"]


def test_both_label_checks_can_be_switched_off(tmp_path, dataset):
    manifest, _ = _image_as_label(tmp_path, dataset)
    out = tmp_path / "out"
    proc = run_cli("stats", manifest, "--out", out, "--no-progress", "--set", "data.labels.max_distinct_values=null",
                   "--set", "data.labels.max_foreground_fraction=null")
    assert proc.returncode == 0, proc.stderr
    assert _stats_done(out) == ["phantom_000", "phantom_001", "phantom_002"]


def test_a_lower_foreground_bound_refuses_a_real_mask(tmp_path, dataset, manifest):
    """The bound is the user's: a bound below a case's lesion share refuses that case."""
    label = np.asarray(nib.load(str(dataset[1].label)).dataobj)
    share = np.count_nonzero(label) / label.size
    out = tmp_path / "out"
    proc = run_cli("stats", manifest, "--out", out, "--no-progress",
                   "--set", f"data.labels.max_foreground_fraction={share * 0.9}")
    assert proc.returncode == 1, proc.stderr
    assert f"label foreground covers {share:.2%}" in read_failures(out)["phantom_001"]


def test_an_image_given_as_the_reference_fails_its_case_in_evaluate(tmp_path, dataset, predictions):
    manifest, _ = _image_as_label(tmp_path, dataset)
    out = tmp_path / "out"
    proc = run_cli("evaluate", "--pred", predictions, "--manifest", manifest, "--out", out, "--no-progress")
    assert_some_failed(proc)
    failures = read_failures(out)
    assert list(failures) == ["phantom_000"]
    assert "looks like an image, not a label" in failures["phantom_000"]
    assert str(dataset[0].images["t1"]) in failures["phantom_000"]


def write_train_config(path: Path, manifest: Path, **train) -> Path:
    """A tiny 2.5D U-Net config for the phantoms (2 channels x 3 slices, 32 x 32 patches)."""
    return write_tiny_config(path, manifest, {"train": {"samples_per_epoch": 8, "patch_size": [32, 32], **train}})


def test_an_image_given_as_the_label_is_refused_by_train(tmp_path, dataset):
    rows = case_rows(dataset)
    rows[1]["label"] = str(dataset[1].images["t1"])  # phantom_001 is the training case
    config = write_train_config(tmp_path / "c.yaml", write_rows(tmp_path / "m.csv", rows))
    proc = run_cli("train", config, "--out", tmp_path / "run", "--no-progress")
    assert_refused(proc, str(dataset[1].images["t1"]), "looks like an image, not a label")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_an_image_given_as_the_label_is_refused_by_plan(tmp_path, dataset):
    rows = case_rows(dataset)
    rows[2]["label"] = str(dataset[2].images["t1"])  # phantom_002 (val) is in the pool
    proc = run_cli("plan", write_rows(tmp_path / "m.csv", rows), "--out", tmp_path / "plan.yaml", "--no-measure",
                   "--no-progress")
    assert_refused(proc, str(dataset[2].images["t1"]), "looks like an image, not a label")
    assert not (tmp_path / "plan.yaml").exists()


# --------------------------------------------------------------------------- blank scans


def _constant_copy(source: Path, path: Path, value: int = 0) -> Path:
    image = nib.load(str(source))
    nib.save(nib.Nifti1Image(np.full(image.shape, value, dtype=np.int16), image.affine), str(path))
    return path


def test_a_constant_image_fails_its_case_in_infer(tmp_path, dataset, checkpoint):
    rows = case_rows(dataset)
    rows[0]["split"] = rows[1]["split"] = "test"
    blank = _constant_copy(dataset[1].images["flair"], tmp_path / "blank_flair.nii.gz")
    rows[1]["image_flair"] = str(blank)
    out = tmp_path / "out"
    proc = run_cli("infer", "--checkpoint", checkpoint, "--manifest", write_rows(tmp_path / "m.csv", rows),
                   "--split", "test", "--out", out, "--no-progress")
    assert_some_failed(proc)
    failures = read_failures(out)
    assert list(failures) == ["phantom_001"]
    assert f"{blank}: image is constant (all voxels 0): an empty or failed export?" in failures["phantom_001"]
    assert (out / "phantom_000_mask.nii.gz").is_file() and not list(out.glob("phantom_001*"))
    assert not leftovers(out)


def test_a_constant_image_is_refused_by_train(tmp_path, dataset):
    rows = case_rows(dataset)
    blank = _constant_copy(dataset[1].images["t1"], tmp_path / "blank_t1.nii.gz", value=-1024)
    rows[1]["image_t1"] = str(blank)
    config = write_train_config(tmp_path / "c.yaml", write_rows(tmp_path / "m.csv", rows))
    proc = run_cli("train", config, "--out", tmp_path / "run", "--no-progress")
    assert_refused(proc, f"{blank}: image is constant (all voxels -1024)")


# --------------------------------------------------------------------------- import fractions


def _import(tmp_path: Path, dataset, *fractions: str):
    folder = Path(dataset[0].images["t1"]).parent
    return run_cli("import", "files", "--images", f"{folder}/*_t1.nii.gz", "--modality", "MR",
                   "--out", tmp_path / "imported.csv", *fractions)


def test_fractions_outside_zero_one_are_refused(tmp_path, dataset):
    for args, needle in [
        (("--val-fraction", "1.5"), "argument --val-fraction: 1.5 is outside [0, 1)"),
        (("--test-fraction", "-0.1"), "argument --test-fraction: -0.1 is outside [0, 1)"),
        (("--val-fraction", "nan"), "argument --val-fraction: nan is outside [0, 1)"),
        (("--val-fraction", "a fifth"), "argument --val-fraction: 'a fifth' is not a number"),
    ]:
        proc = _import(tmp_path, dataset, *args)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert [line for line in proc.stderr.splitlines() if "error:" in line] == [
            f"medseg import files: error: {needle} (a share of patients, e.g. 0.2)"
        ], proc.stderr
        assert not (tmp_path / "imported.csv").exists()


def test_val_and_test_fractions_must_leave_training_patients(tmp_path, dataset):
    proc = _import(tmp_path, dataset, "--val-fraction", "0.6", "--test-fraction", "0.4")
    assert_refused(proc, "--val-fraction 0.6 + --test-fraction 0.4 leave no patient for training")
    assert not (tmp_path / "imported.csv").exists()
    proc = _import(tmp_path, dataset, "--val-fraction", "0", "--test-fraction", "0.5")
    assert proc.returncode == 0, proc.stderr
