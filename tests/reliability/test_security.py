"""Security fixes of the second reliability sweep (issue 32): what medseg reads and writes must not
leak identifiers or load files a folder does not vouch for.

- A site-secret file the group or others may read is refused, as ssh refuses such a private key
  (one line naming the file, its mode and ``chmod 600 FILE``); a new one is created 0600.
- ``import dicom --map-file`` (the only link back to identifiers) is written 0600.
- ``case_stats.csv`` carries ``case_id`` only, ``patient_id`` only on request.
- A model folder's ``model.json`` loads only plain file names inside the folder (no ``..``, no
  absolute path, no link leading out), each with its sha256.
- The ``import dicom`` manifest holds no source folder name (its rows point at
  ``dicom_series/<case_id>/``; the links' targets do name the source, docs/dicom.md).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.atomic import sha256_file
from medseg.io import Geometry

from .conftest import CHANNELS, assert_refused, error_lines

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dicom_helpers import PATIENT_ID, write_series  # noqa: E402

SECRET = "3c" * 32
SOURCE_PARTS = ("Doe_Jane_12345678", "CT_HEAD_2026")


def medseg(*args: str | Path, secret_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m medseg.cli ARGS`` with a fixed site secret, or with ``secret_file`` as the
    secret file (and no secret in the environment)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if secret_file is None:
        env["MEDSEG_SITE_SECRET"] = SECRET
    else:
        env.pop("MEDSEG_SITE_SECRET", None)
        env["MEDSEG_SITE_SECRET_FILE"] = str(secret_file)
    return subprocess.run([sys.executable, "-m", "medseg.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)  # fmt: skip


def _archive(root: Path) -> Path:
    """One CT series in folders named after the patient and the exam, as hospital exports are."""
    shape = (8, 8, 4)
    geometry = Geometry(shape, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    write_series(root.joinpath(*SOURCE_PARTS), np.zeros(shape, np.int16), geometry)
    return root


# ----------------------------------------------------------------------------- site secret


def test_a_group_readable_secret_file_is_refused_like_an_ssh_key(tmp_path):
    root = _archive(tmp_path / "archive")
    secret = tmp_path / "site_secret"
    secret.write_text("ab" * 32 + "\n")
    secret.chmod(0o644)
    proc = medseg("import", "dicom", root, "--out", tmp_path / "m.csv", secret_file=secret)
    assert_refused(proc, str(secret), "0644", f"chmod 600 {secret}")
    assert not (tmp_path / "m.csv").exists()
    secret.chmod(0o640)
    assert_refused(medseg("import", "dicom", root, "--out", tmp_path / "m.csv", secret_file=secret), "0640")
    secret.chmod(0o600)
    proc = medseg("import", "dicom", root, "--out", tmp_path / "m.csv", "--val-fraction", "0", secret_file=secret)
    assert proc.returncode == 0, proc.stderr


def test_a_new_secret_file_is_owner_only(tmp_path):
    root = _archive(tmp_path / "archive")
    secret = tmp_path / "config" / "medseg" / "site_secret"
    proc = medseg("import", "dicom", root, "--out", tmp_path / "m.csv", "--val-fraction", "0", secret_file=secret)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.parent.stat().st_mode) & 0o077 == 0
    # and it is accepted on the next run
    assert medseg("import", "dicom", root, "--out", tmp_path / "m2.csv", "--val-fraction", "0",
                  secret_file=secret).returncode == 0  # fmt: skip


# ----------------------------------------------------------------------------- import dicom outputs


def test_the_map_file_is_owner_only_and_the_manifest_names_no_source_folder(tmp_path):
    root = _archive(tmp_path / "archive")
    out = tmp_path / "out"
    old_umask = os.umask(0o022)  # the usual umask: a plain write would give 0644
    try:
        proc = medseg("import", "dicom", root, "--out", out / "m.csv", "--map-file", out / "map.csv", "--val-fraction", "0")
    finally:
        os.umask(old_umask)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE((out / "map.csv").stat().st_mode) == 0o600
    assert SOURCE_PARTS[0] in (out / "map.csv").read_text()  # the map is the one link back
    text = (out / "m.csv").read_text()
    with (out / "m.csv").open(newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    (image,) = [v for k, v in row.items() if k.startswith("image")]
    assert Path(image).parts == ("dicom_series", row["case_id"]), image
    assert set(row) == {"case_id", "patient_id", "modality", "image_image", "label", "split"}, row
    for part in (*SOURCE_PARTS, "archive", PATIENT_ID, "Doe"):
        assert part not in text, (part, text)
    # the series folder's own names are pseudonymous; its links' targets name the source (documented)
    names = [p.relative_to(out).as_posix() for p in (out / "dicom_series").rglob("*")]
    assert not any(part in name for part in SOURCE_PARTS for name in names), names
    links = sorted((out / "dicom_series" / row["case_id"]).iterdir())
    assert links and all(link.is_symlink() for link in links)
    # a rerun replaces the map with the same owner-only mode
    assert medseg("import", "dicom", root, "--out", out / "m.csv", "--map-file", out / "map.csv").returncode == 0
    assert stat.S_IMODE((out / "map.csv").stat().st_mode) == 0o600


# ----------------------------------------------------------------------------- stats


def test_case_stats_carry_case_ids_only_unless_asked(tmp_path, manifest, dataset):
    proc = medseg("stats", manifest, "--out", tmp_path / "stats", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    with (tmp_path / "stats" / "case_stats.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(dataset) and "patient_id" not in rows[0]
    for case in dataset:
        assert case.patient_id != case.case_id
        for csv_file in (tmp_path / "stats").glob("*.csv"):
            assert case.patient_id not in csv_file.read_text(), csv_file
    proc = medseg("stats", manifest, "--out", tmp_path / "with", "--no-progress", "--set", "stats.include_patient_id=true")
    assert proc.returncode == 0, proc.stderr
    with (tmp_path / "with" / "case_stats.csv").open(newline="") as fh:
        assert {r["case_id"]: r["patient_id"] for r in csv.DictReader(fh)} == {c.case_id: c.patient_id for c in dataset}


# ----------------------------------------------------------------------------- model folder


def _model_folder(folder: Path, checkpoint: Path, entries: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "fold_0.pt").exists():
        shutil.copyfile(checkpoint, folder / "fold_0.pt")
    if entries is None:
        entries = [{"file": "fold_0.pt", "sha256": sha256_file(folder / "fold_0.pt")}]
    record = {"format": "medseg-model-folder", "format_version": 1, "checkpoints": entries, "channels": CHANNELS,
              "modality": "MR", "postprocess": {}}  # fmt: skip
    (folder / "model.json").write_text(json.dumps(record))
    return folder


def _entries(tmp_path: Path, checkpoint: Path) -> dict[str, tuple[list[dict], str]]:
    """Bad ``checkpoints`` lists of model.json and what the refusal says."""
    outside = tmp_path / "elsewhere" / "x.pt"
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint, outside)
    sha = sha256_file(outside)
    return {
        "parent": ([{"file": "../../elsewhere/x.pt", "sha256": sha}], "plain file name"),
        "absolute": ([{"file": str(outside), "sha256": sha}], "plain file name"),
        "no-sha256": ([{"file": "fold_0.pt"}], "no sha256"),
        "link-out": ([{"file": "link.pt", "sha256": sha}], "outside the model folder"),
    }


@pytest.mark.parametrize("bad", ["parent", "absolute", "no-sha256", "link-out"])
def test_model_json_loads_only_files_of_the_folder_with_their_sha256(tmp_path, checkpoint, manifest, bad):
    folder = tmp_path / "models" / "m"
    entries, fragment = _entries(tmp_path, checkpoint)[bad]
    _model_folder(folder, checkpoint, entries)
    if bad == "link-out":
        (folder / "link.pt").symlink_to(tmp_path / "elsewhere" / "x.pt")
    proc = medseg("infer", "--model", folder, "--manifest", manifest, "--out", tmp_path / "pred", "--no-progress")
    line = assert_refused(proc, "model.json", "checkpoint entry 1", fragment)
    assert repr(entries[0]["file"]) in line
    assert not any((tmp_path / "pred").glob("*_mask.nii.gz"))


def test_a_model_folder_as_medseg_writes_it_is_loaded(tmp_path, checkpoint, manifest):
    folder = _model_folder(tmp_path / "m", checkpoint)
    proc = medseg("infer", "--model", folder, "--manifest", manifest, "--out", tmp_path / "pred", "--no-progress")
    assert proc.returncode == 0 and not error_lines(proc.stderr), proc.stderr
    assert len(list((tmp_path / "pred").glob("*_mask.nii.gz"))) == 3
