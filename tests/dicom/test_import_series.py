"""`medseg import dicom`: one row per series (never two merged), per-row series folders of links,
--channel / --model / --series channels, refusals with a failures file, pseudonymous ids only."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_checkpoint
from dicom_helpers import PATIENT_ID, PATIENT_NAME, STUDY_UID, write_series

from medseg.io import Geometry, read_volume
from medseg.manifest import read_manifest

SECRET = "5e" * 32
CASE_ID = re.compile(r"^P[0-9a-f]{16}_st?\d+$")
UID = "1.2.826.0.1.3680043.8.498."


def add_series(folder: Path, uid: str, *, slices: int = 5, modality: str = "MR", description: str = "",
               patient_id: str = PATIENT_ID, study_uid: str = STUDY_UID, number: int = 3,
               protocol: str | None = None) -> list[Path]:  # fmt: skip
    """A synthetic series written into ``folder`` beside whatever is there (file names prefixed
    with the series number), with the given header values. Returns its files."""
    import pydicom

    shape = (10, 8, slices)
    geometry = Geometry(shape, (0.9, 0.8, 2.5), (4.0, -2.0, 7.0), tuple(np.eye(3).ravel()))
    array = (np.arange(np.prod(shape)).reshape(shape) % 97).astype(np.int16)
    staging = folder.parent / f".staging-{uid}"
    files = []
    for path in write_series(staging, array, geometry, modality="CT" if modality == "CT" else "MR", series_uid=uid):
        ds = pydicom.dcmread(path)
        ds.Modality, ds.SeriesDescription, ds.PatientID = modality, description, patient_id
        ds.StudyInstanceUID, ds.SeriesNumber = study_uid, number
        if protocol is not None:
            ds.ProtocolName = protocol
        target = folder / f"s{number}_{uid.rsplit('.', 1)[-1]}_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
        files.append(target)
    shutil.rmtree(staging)
    return files


def medseg_import(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDSEG_SITE_SECRET": SECRET}
    return subprocess.run([sys.executable, "-m", "medseg.cli", "import", "dicom", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, check=False)  # fmt: skip


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def link_targets(folder: Path) -> set[Path]:
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"{i:04d}.dcm" for i in range(len(names))]  # plain names, no source names
    return {(folder / n).resolve() for n in names}


def assert_no_identifiers(text: str) -> None:
    for word in (PATIENT_ID, PATIENT_NAME, "Doe", "19700101", "Smith", "archive"):
        assert word not in text, word


@pytest.mark.slow  # several `medseg import dicom` subprocesses: 28-34 s on a loaded 2-core machine
def test_two_series_in_one_folder_become_two_rows_with_their_own_folders(tmp_path):
    archive = tmp_path / "archive"
    t1 = add_series(archive / "Doe_Jane" / "exam", UID + "11", slices=5, description="T1 SE", number=3)
    t2 = add_series(archive / "Doe_Jane" / "exam", UID + "12", slices=7, description="T2 TSE", number=4)
    # one series split over two folders is still one series
    split = add_series(archive / "Doe_Jane" / "part_a", UID + "13", slices=6, description="FLAIR", number=5)
    for f in split[3:]:
        (archive / "Doe_Jane" / "part_b").mkdir(exist_ok=True)
        f.rename(archive / "Doe_Jane" / "part_b" / f.name)
    split = sorted([*(archive / "Doe_Jane" / "part_a").iterdir(), *(archive / "Doe_Jane" / "part_b").iterdir()])
    add_series(archive / "Doe_Jane" / "exam", UID + "14", slices=1, description="localizer", number=1)
    add_series(archive / "Doe_Jane" / "exam", UID + "15", slices=3, modality="OT", description="screen", number=99)
    (archive / "notes.txt").write_text("not DICOM")
    out = tmp_path / "out" / "m.csv"
    proc = medseg_import(archive, "--out", out, "--map-file", tmp_path / "map.csv", "--val-fraction", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "1 instance, not a volume" in proc.stderr and "modality OT is not CT or MR" in proc.stderr
    cases = read_manifest(out)
    assert len(cases) == 3 and all(CASE_ID.match(c.case_id) for c in cases)
    assert len({c.patient_id for c in cases}) == 1
    by_slices = {}
    for case in cases:
        folder = case.images["image"]
        assert folder == (tmp_path / "out" / "dicom_series" / case.case_id).resolve()
        volume = read_volume(folder)
        by_slices[volume.shape[2]] = link_targets(folder)
    assert by_slices == {5: {f.resolve() for f in t1}, 7: {f.resolve() for f in t2}, 6: {f.resolve() for f in split}}
    # the manifest points at the series folders by relative paths; ids and messages carry no identifier
    manifest_text = out.read_text()
    assert "dicom_series/" in manifest_text and str(tmp_path) not in manifest_text
    assert_no_identifiers(manifest_text + proc.stdout.replace(str(tmp_path), "") + proc.stderr.replace(str(tmp_path), ""))
    assert read_rows(tmp_path / "out" / "m_failures.csv") == []
    mapping = read_rows(tmp_path / "map.csv")
    assert {(r["series_uid"], r["case_id"]) for r in mapping} == {
        (UID + "11", cases[0].case_id), (UID + "12", cases[1].case_id), (UID + "13", cases[2].case_id)}
    assert next(r["folder"] for r in mapping if r["series_uid"] == UID + "13") == "Doe_Jane/part_a;Doe_Jane/part_b"
    # importing again (manifest inside the archive this time) replaces the folders and never reads the links
    again = archive / "m.csv"
    proc = medseg_import(archive, "--out", again, "--val-fraction", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = medseg_import(archive, "--out", again, "--val-fraction", "0", cwd=tmp_path)
    assert proc.returncode == 0 and "repeat an instance" not in proc.stderr, proc.stderr
    assert [c.case_id for c in read_manifest(again)] == [c.case_id for c in cases]


def test_channel_names_the_column(tmp_path):
    add_series(tmp_path / "archive" / "a", UID + "21", modality="CT", description="abdomen")
    proc = medseg_import(tmp_path / "archive", "--channel", "CT", "--out", tmp_path / "m.csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    header = (tmp_path / "m.csv").read_text().splitlines()[0].split(",")
    assert header == ["case_id", "patient_id", "modality", "image_ct", "label", "split"]
    (case,) = read_manifest(tmp_path / "m.csv")
    assert case.modality == "CT" and read_volume(case.images["ct"]).shape == (10, 8, 5)


@pytest.mark.slow  # several `medseg import dicom` subprocesses: 28-34 s on a loaded 2-core machine
def test_model_names_the_channel_and_drops_other_modalities(tmp_path):
    archive = tmp_path / "archive"
    add_series(archive / "ct", UID + "31", modality="CT", description="chest", number=2)
    add_series(archive / "mr", UID + "32", modality="MR", description="T1", number=5)
    model = save_tiny_checkpoint(tmp_path / "model.pt", ["ct"], "CT")
    proc = medseg_import(archive, "--model", model, "--out", tmp_path / "m.csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (case,) = read_manifest(tmp_path / "m.csv")
    assert case.channels == ["ct"] and case.modality == "CT"
    assert read_volume(case.images["ct"]).shape[2] == 5
    lines = [line for line in proc.stderr.splitlines() if "the model takes CT" in line]
    assert len(lines) == 1 and "modality MR" in lines[0]
    # --channel must agree with the model
    proc = medseg_import(archive, "--model", model, "--channel", "flair", "--out", tmp_path / "m2.csv", cwd=tmp_path)
    assert proc.returncode == 2 and "--channel flair disagrees with the model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "m2.csv").exists()
    # a model with several channels needs a rule for each
    multi = save_tiny_checkpoint(tmp_path / "multi.pt", ["flair", "t1"], "MR")
    proc = medseg_import(archive, "--model", multi, "--out", tmp_path / "m3.csv", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "takes channels flair, t1 (MR)" in proc.stderr and "--series flair=REGEX --series t1=REGEX" in proc.stderr
    proc = medseg_import(archive, "--model", multi, "--series", "flair=flair", "--out", tmp_path / "m3.csv", cwd=tmp_path)
    assert proc.returncode == 2 and "add --series t1=REGEX" in proc.stderr


def write_mr_study(root: Path, name: str, study_uid: str, descriptions: list[str], patient_id: str = PATIENT_ID) -> None:
    for n, description in enumerate(descriptions):
        add_series(root / name, f"{study_uid}.{n + 1}", description=description, number=n + 2, study_uid=study_uid,
                   patient_id=patient_id, slices=4 + n)  # fmt: skip


def test_series_rules_make_one_row_per_study(tmp_path):
    archive = tmp_path / "archive"
    write_mr_study(archive, "visit1", UID + "41", ["FLAIR", "T1 SE", "T2 TSE"])
    add_series(archive / "visit1", UID + "41.9", description="t1 localizer", number=1, study_uid=UID + "41", slices=1)
    proc = medseg_import(archive, "--series", "flair=FLAIR", "--series", "t1=T1", "--out", tmp_path / "m.csv",
                         "--map-file", tmp_path / "map.csv", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (case,) = read_manifest(tmp_path / "m.csv")
    assert case.channels == ["flair", "t1"] and case.case_id.endswith("_st1") and case.modality == "MR"
    for channel, slices, uid in (("flair", 4, UID + "41.1"), ("t1", 5, UID + "41.2")):
        folder = case.images[channel]
        assert folder == (tmp_path / "dicom_series" / case.case_id / channel).resolve()
        assert read_volume(folder).shape[2] == slices
        assert {t.name.split("_")[1] for t in link_targets(folder)} == {uid.rsplit(".", 1)[-1]}
    assert {(r["channel"], r["series_uid"]) for r in read_rows(tmp_path / "map.csv")} == {
        ("flair", UID + "41.1"), ("t1", UID + "41.2")}
    # a rule matching through ProtocolName
    archive2 = tmp_path / "archive2"
    add_series(archive2 / "v", UID + "43.1", description="", protocol="ax_flair_fs", number=2, study_uid=UID + "43")
    add_series(archive2 / "v", UID + "43.2", description="T1 SE", number=3, study_uid=UID + "43")
    proc = medseg_import(archive2, "--series", "flair=flair", "--series", "t1=^t1", "--out", tmp_path / "p.csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_bad_studies_are_refused_one_line_each_and_good_ones_written(tmp_path):
    archive = tmp_path / "archive"
    write_mr_study(archive, "good", UID + "51", ["FLAIR", "T1 SE", "T2 TSE"], patient_id="A-1")
    write_mr_study(archive, "no_t1", UID + "52", ["FLAIR", "T2 TSE"], patient_id="B-2")
    write_mr_study(archive, "two_t1", UID + "53", ["FLAIR", "T1 SE", "T1 SE post"], patient_id="C-3")
    out = tmp_path / "m.csv"
    proc = medseg_import(archive, "--series", "flair=FLAIR", "--series", "t1=T1", "--out", out, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    (case,) = read_manifest(out)
    assert case.channels == ["flair", "t1"]
    refused = [line for line in proc.stderr.splitlines() if line.startswith("refused ")]
    assert len(refused) == 2
    failures = read_rows(tmp_path / "m_failures.csv")
    assert [list(r) for r in failures] == [["what", "error"]] * 2
    by_problem = {("no series matches" in r["error"]): r for r in failures}
    missing, doubled = by_problem[True], by_problem[False]
    assert CASE_ID.match(missing["what"]) and CASE_ID.match(doubled["what"])
    assert "channel t1: no series matches 'T1'" in missing["error"]
    assert '2 MR "FLAIR" 4 instance(s); 3 MR "T2 TSE" 5 instance(s)' in missing["error"]
    assert "channel t1: 2 series (3, 4) match 'T1'" in doubled["error"]
    assert '4 MR "T1 SE post" 6 instance(s)' in doubled["error"]
    assert all("make each --series REGEX match exactly one" in r["error"] for r in failures)
    for line, row in zip(refused, failures, strict=True):
        assert line == f"refused {row['what']}: {row['error']}"
    written = proc.stderr.replace(str(tmp_path), "") + (tmp_path / "m_failures.csv").read_text() + out.read_text()
    assert_no_identifiers(written)
    for word in ("A-1", "B-2", "C-3", "no_t1", "two_t1"):
        assert word not in written
    # a bad regular expression is one line naming it
    proc = medseg_import(archive, "--series", "t1=T1(", "--out", tmp_path / "x.csv", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--series t1=T1(: 'T1(' is not a valid regular expression" in proc.stderr


def test_empty_patient_id_is_refused_unless_allowed(tmp_path):
    archive = tmp_path / "archive"
    add_series(archive / "anon", UID + "61", patient_id="", description="T1", study_uid=UID + "60")
    out = tmp_path / "m.csv"
    proc = medseg_import(archive, "--out", out, cwd=tmp_path)
    assert proc.returncode == 2 and not out.exists()
    assert "PatientID is empty; give --allow-missing-patient-id to key it on the StudyInstanceUID" in proc.stderr
    assert "error: " in proc.stderr and "no usable CT/MR series" in proc.stderr
    add_series(archive / "named", UID + "62", patient_id="Z-9", description="T1", study_uid=UID + "63")
    proc = medseg_import(archive, "--out", out, cwd=tmp_path)
    assert proc.returncode == 1 and len(read_manifest(out)) == 1
    (failure,) = read_rows(tmp_path / "m_failures.csv")
    assert failure["what"].startswith("study P") and failure["what"].endswith("series 3")
    assert "--allow-missing-patient-id" in failure["error"]
    proc = medseg_import(archive, "--out", out, "--allow-missing-patient-id", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cases = read_manifest(out)
    assert len(cases) == 2 and len({c.patient_id for c in cases}) == 2
    assert read_rows(tmp_path / "m_failures.csv") == []


def test_one_uid_shared_by_two_patients_is_refused_and_odd_folder_names_are_linked(tmp_path):
    from medseg.importers import import_dicom

    archive = tmp_path / "archive"
    odd = archive / os.fsdecode(b"M\xfcller")  # a Latin-1 folder name: not UTF-8, ITK could not take it
    add_series(odd, UID + "71", slices=6, description="T1", patient_id="K-1")
    add_series(archive / "copy1", UID + "72", slices=4, description="T2", patient_id="K-2")
    shutil.copytree(archive / "copy1", archive / "copy2")  # the same files twice: one series, counted once
    for path in add_series(archive / "other", UID + "72", slices=4, patient_id="K-3", number=8):
        path.rename(path.with_name("x" + path.name))
    result = import_dicom(archive, series_dir=tmp_path / "links", map_file=tmp_path / "map.csv")
    (case,) = result.cases
    assert read_volume(case.images["image"]).shape == (10, 8, 6)
    (refusal,) = result.refusals
    assert refusal.what.startswith("study P") and "2 different PatientIDs" in refusal.error
    assert "K-2" not in refusal.error and "K-3" not in refusal.error and "copy" not in refusal.error
    # a case folder holding something medseg did not write is never deleted
    (tmp_path / "links" / case.case_id / "notes.txt").write_text("mine")
    from medseg.errors import OutputError

    with pytest.raises(OutputError, match="notes.txt, which medseg import dicom did not write"):
        import_dicom(archive, series_dir=tmp_path / "links")
