"""File names whose bytes are not UTF-8 (a Latin-1 name on a UTF-8 system): SimpleITK aborts the
whole process on such a path, so medseg never hands it one. Reading works (through a link with a
plain name), and a manifest that cannot hold the name is refused in one line."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from .conftest import assert_refused, leftovers, run_cli

pytestmark = pytest.mark.skipif(sys.platform == "win32" or sys.getfilesystemencoding() != "utf-8",
                                reason="needs a POSIX file system with UTF-8 file names")  # fmt: skip

LATIN1_NAME = b"caf\xe9"  # "café" in Latin-1: not valid UTF-8


def latin1_copy(folder: Path, source: Path, suffix: str) -> Path:
    """Copy ``source`` to ``folder/café<suffix>`` with the name's bytes in Latin-1."""
    target = os.path.join(os.fsencode(folder), LATIN1_NAME + suffix.encode())
    shutil.copyfile(os.fsencode(source), target)
    return Path(os.fsdecode(target))


def test_infer_reads_a_file_whose_name_is_not_utf8(tmp_path, dataset, checkpoint):
    flair = latin1_copy(tmp_path, dataset[0].images["flair"], "_flair.nii.gz")
    t1 = latin1_copy(tmp_path, dataset[0].images["t1"], "_t1.nii.gz")
    good = dataset[1].images
    out = tmp_path / "out"
    proc = run_cli("infer", "--checkpoint", checkpoint, "--out", out, "--no-progress",
                   "--input", flair, t1, "--input", "case=other", good["flair"], good["t1"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "café_mask.nii.gz").is_file()  # the id reads the Latin-1 bytes as Latin-1
    assert (out / "other_mask.nii.gz").is_file()
    assert not leftovers(out)


def test_import_files_refuses_a_name_a_utf8_manifest_cannot_hold(tmp_path, dataset):
    images = tmp_path / "images"
    images.mkdir()
    latin1_copy(images, dataset[0].images["flair"], ".nii.gz")
    shutil.copyfile(dataset[1].images["flair"], images / "plain.nii.gz")
    out = tmp_path / "manifest.csv"
    proc = run_cli("import", "files", "--images", f"{images}/*.nii.gz", "--modality", "MR", "--out", out)
    assert_refused(proc, "not valid UTF-8", "caf\\xe9", "rename")
    assert not out.exists()
    assert not leftovers(tmp_path)
