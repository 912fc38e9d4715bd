"""Manifests and configs that are not clean UTF-8 CSV/YAML, and device names that cannot work:
one line naming the file (row, line) and the problem, exit 2, no traceback."""

from __future__ import annotations

import pytest

from .conftest import HEADER, assert_refused, run_cli


def test_row_with_too_many_fields_is_named(tmp_path, manifest):
    lines = manifest.read_text().splitlines()
    lines[2] = lines[2] + ",surplus,fields"
    manifest.write_text("\n".join(lines) + "\n")
    proc = run_cli("stats", manifest, "--out", tmp_path / "out", "--no-progress")
    assert_refused(proc, str(manifest), "row 3", f"9 field(s) but the header has {len(HEADER)}")


def test_row_with_too_few_fields_is_named(tmp_path, manifest):
    lines = manifest.read_text().splitlines()
    lines[1] = ",".join(lines[1].split(",")[:3])
    manifest.write_text("\n".join(lines) + "\n")
    proc = run_cli("stats", manifest, "--out", tmp_path / "out", "--no-progress")
    assert_refused(proc, "row 2", "3 field(s)")


def test_latin1_manifest_names_line_and_byte(tmp_path, manifest):
    text = manifest.read_text().splitlines()
    text[3] = text[3].replace("phantom_002", "phantom_é", 1)
    manifest.write_bytes(("\n".join(text) + "\n").encode("latin-1"))
    proc = run_cli("stats", manifest, "--out", tmp_path / "out", "--no-progress")
    assert_refused(proc, str(manifest), "not UTF-8 text", "byte 0xe9 at line 4", "save it as UTF-8")


def test_binary_manifest_is_refused(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)))
    proc = run_cli("stats", manifest, "--out", tmp_path / "out", "--no-progress")
    assert_refused(proc, str(manifest), "binary file")


@pytest.mark.parametrize("content", [b"train:\n  epochs: 3\n  # caf\xe9\n", b"\x00\x01\x02binary", b"train: [1, 2\n"])
def test_bad_config_file_is_one_line(tmp_path, manifest, content):
    config = tmp_path / "config.yaml"
    config.write_bytes(content)
    proc = run_cli("stats", manifest, "--config", config, "--out", tmp_path / "out", "--no-progress")
    line = assert_refused(proc, str(config))
    assert any(word in line for word in ("not UTF-8 text", "binary file", "not valid YAML"))
    if content.startswith(b"train: ["):
        assert "line 2" in line


def test_bad_pipeline_file_is_one_line(tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_bytes(b"name: caf\xe9\nstages: [validate]\n")
    assert_refused(run_cli("run", pipeline, "--out", tmp_path / "run", "--no-progress"), str(pipeline), "not UTF-8 text")


@pytest.mark.parametrize(("device", "fragment"), [("bogus", "not a device name"), ("mps", "cpu or cuda"),
                                                  ("cuda", "no CUDA GPU"), ("cuda:7", "CUDA")])
def test_device_that_cannot_work_is_one_line(tmp_path, manifest, checkpoint, device, fragment):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the CUDA device asked for")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    out = tmp_path / "out"
    proc = run_cli("infer", "--checkpoint", checkpoint, "--manifest", manifest, "--out", out, "--device", device,
                   "--no-progress")
    assert_refused(proc, f"--device {device!r}", fragment)
    assert not list(out.glob("*_mask.nii.gz"))
