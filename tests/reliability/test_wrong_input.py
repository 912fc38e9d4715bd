"""Silently wrong input and crashes of the second sweep (issue 32) not covered elsewhere: a
duplicated manifest column, one scan under two patients in two splits, a truncated uncompressed
``.nii``, a sliding window smaller than the network's stride, ``train`` onto a full disk."""

from __future__ import annotations

import shutil
import subprocess
import sys

from .conftest import (
    ENV,
    HEADER,
    assert_refused,
    assert_some_failed,
    case_rows,
    read_failures,
    run_cli,
    write_rows,
)
from .test_plausibility import write_train_config
from .test_writes_verified import _fill, small_disk  # noqa: F401 - the fixture


def test_duplicated_manifest_column_is_refused(tmp_path, dataset):
    rows = case_rows(dataset)
    path = tmp_path / "m.csv"
    header = [*HEADER[:4], "image_flair", *HEADER[4:]]  # image_flair twice: a reader would keep the second
    lines = [",".join(header)] + [",".join([r[h] for h in HEADER[:4]] + [r["image_t1"]] + [r[h] for h in HEADER[4:]])
                                  for r in rows]
    path.write_text("\n".join(lines) + "\n")
    line = assert_refused(run_cli("stats", path, "--out", tmp_path / "stats"), str(path), "['image_flair']",
                          "more than once")
    assert "each column once" in line and not (tmp_path / "stats").exists()


def test_one_scan_under_two_patients_in_two_splits_is_refused(tmp_path, dataset):
    rows = case_rows(dataset)
    copy = tmp_path / "copy_flair.nii.gz"
    shutil.copyfile(rows[0]["image_flair"], copy)
    rows[1]["image_flair"] = str(copy)  # the test patient's FLAIR is, byte for byte, a training patient's
    rows[0]["split"], rows[1]["split"] = "train", "test"
    manifest = write_rows(tmp_path / "m.csv", rows)
    assert_refused(run_cli("stats", manifest, "--out", tmp_path / "stats"), "identical image files",
                   repr(rows[0]["patient_id"]), "leaks the test patients into training")
    rows[1]["image_flair"] = rows[0]["image_flair"]  # the same path
    manifest = write_rows(tmp_path / "m2.csv", rows)
    assert_refused(run_cli("stats", manifest, "--out", tmp_path / "stats2"), "the same image file under patient_ids")


def test_truncated_plain_nifti_is_a_case_failure(tmp_path, dataset, checkpoint):
    import nibabel as nib

    rows = case_rows(dataset)
    plain = tmp_path / "t1.nii"
    nib.save(nib.load(rows[0]["image_t1"]), str(plain))
    data = plain.read_bytes()
    plain.write_bytes(data[: len(data) // 2])  # half the voxels gone: ITK would read zeros there
    rows[0]["image_t1"] = str(plain)
    manifest = write_rows(tmp_path / "m.csv", rows)
    out = tmp_path / "out"
    proc = run_cli("infer", "--checkpoint", checkpoint, "--manifest", manifest, "--out", out)
    assert_some_failed(proc)
    error = read_failures(out)[rows[0]["case_id"]]
    assert str(plain) in error and "file is truncated" in error and "the header promises" in error
    assert (out / f"{rows[1]['case_id']}_mask.nii.gz").is_file()


def test_window_smaller_than_the_network_stride_is_refused(tmp_path, manifest, checkpoint):
    proc = run_cli("infer", "--checkpoint", checkpoint, "--manifest", manifest, "--out", tmp_path / "out",
                   "--set", "inference.roi_size=[8,8]")
    assert_refused(proc, "inference.roi_size [8, 8] is smaller than the network's stride", "give at least")


def test_train_onto_a_full_disk_is_one_line(tmp_path, dataset, small_disk):  # noqa: F811 - the fixture
    config = write_train_config(tmp_path / "c.yaml", write_rows(tmp_path / "m.csv", case_rows(dataset)), epochs=1,
                                cache_dir=str(tmp_path / "cache"))
    _fill(small_disk, leave=64 * 1024)  # room for the run's small files, not for a checkpoint
    proc = subprocess.run([sys.executable, "-m", "medseg.cli", "train", str(config), "--out", str(small_disk / "run")],
                          capture_output=True, text=True, env=ENV, timeout=600, check=False)
    assert_refused(proc, str(small_disk / "run"), "no space left on the device")
    assert "Traceback" not in proc.stderr and "PytorchStreamWriter" not in proc.stderr
