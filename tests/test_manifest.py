from __future__ import annotations

import pytest

from medseg.errors import ManifestError
from medseg.manifest import Case, assign_patient_splits, read_manifest, write_manifest

HEADER = "case_id,patient_id,modality,image_flair,image_t1,label,split\n"


def _touch(tmp_path, *names):
    for n in names:
        (tmp_path / n).write_bytes(b"x")


def test_valid_manifest_relative_paths(tmp_path):
    _touch(tmp_path, "a_f.nii.gz", "a_t.nii.gz", "a_l.nii.gz", "b_f.nii.gz", "b_t.nii.gz")
    (tmp_path / "m.csv").write_text(HEADER + "a,p1,MR,a_f.nii.gz,a_t.nii.gz,a_l.nii.gz,train\nb,p2,mr,b_f.nii.gz,b_t.nii.gz,,\n")
    cases = read_manifest(tmp_path / "m.csv")
    assert [c.case_id for c in cases] == ["a", "b"]
    assert cases[0].channels == ["flair", "t1"]
    assert cases[0].images["t1"] == (tmp_path / "a_t.nii.gz").resolve()
    assert cases[1].label is None and cases[1].modality == "MR" and cases[1].split == ""


def test_every_problem_is_listed_with_row_and_column(tmp_path):
    _touch(tmp_path, "a_f.nii.gz", "a_t.nii.gz", "a_l.nii.gz")
    (tmp_path / "m.csv").write_text(
        HEADER
        + "a,p1,MR,a_f.nii.gz,a_t.nii.gz,a_l.nii.gz,train\n"
        + "a,p1,MR,a_f.nii.gz,a_t.nii.gz,a_l.nii.gz,train\n"  # duplicate id
        + "c,p3,PET,a_f.nii.gz,a_t.nii.gz,a_l.nii.gz,train\n"  # unknown modality
        + "d,p4,MR,missing.nii.gz,a_t.nii.gz,a_l.nii.gz,val\n"  # missing file
        + "e,p5,CT,a_f.nii.gz,,a_l.nii.gz,train\n"  # inconsistent channel columns
        + "f,p6,MR,a_f.nii.gz,a_t.nii.gz,,train\n"  # training row without label
        + "g,p7,MR,a_f.nii.gz,a_t.nii.gz,a_l.nii.gz,training\n"  # unknown split
    )
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path / "m.csv")
    msg = str(info.value)
    own = [m for m in info.value.problems if "leaks the test patients" not in m]
    assert len(own) == 6  # plus: the rows share image files across patients and splits (reported too)
    assert any(m.startswith("the same image file under patient_ids 'p1' (train, row 2)") and "'p4' (val, row 5)" in m
               for m in info.value.problems)
    assert "row 3 (case_id=a): duplicate case_id (first on row 2)" in msg
    assert "row 4 (case_id=c): column modality: unknown modality 'PET'" in msg
    assert "row 5 (case_id=d): column image_flair: file not found" in msg and "missing.nii.gz" in msg
    assert "row 6 (case_id=e): column image_t1 is empty" in msg
    assert "row 7 (case_id=f): column label is empty but split is 'train'" in msg
    assert "row 8 (case_id=g): column split: unknown split 'training'" in msg


def test_missing_columns_and_no_channels(tmp_path):
    (tmp_path / "m.csv").write_text("case_id,modality,label\nx,MR,\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['patient_id', 'split'\]"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "n.csv").write_text("case_id,patient_id,modality,label,split\nx,p,MR,,\n")
    with pytest.raises(ManifestError, match="no input channel column"):
        read_manifest(tmp_path / "n.csv")
    with pytest.raises(ManifestError, match="manifest file not found"):
        read_manifest(tmp_path / "absent.csv")


def test_write_read_roundtrip(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _touch(data, "i.nii.gz", "l.nii.gz")
    cases = [Case("c1", "p1", "CT", {"ct": data / "i.nii.gz"}, data / "l.nii.gz", "train", {"note": "x"})]
    out = write_manifest(cases, tmp_path / "sub" / "m.csv")
    assert "../data/i.nii.gz" in out.read_text()
    back = read_manifest(out)
    assert back[0].images["ct"] == (data / "i.nii.gz").resolve() and back[0].extra == {"note": "x"}


def test_patient_level_split_never_separates_a_patient():
    cases = [Case(f"c{i}", f"p{i // 3}", "MR", {"x": None}, "lab", "") for i in range(30)]  # type: ignore[arg-type]
    assign_patient_splits(cases, val_fraction=0.2, test_fraction=0.2, seed=3)
    by_patient: dict[str, set[str]] = {}
    for c in cases:
        by_patient.setdefault(c.patient_id, set()).add(c.split)
    assert all(len(s) == 1 for s in by_patient.values())
    splits = [next(iter(s)) for s in by_patient.values()]
    assert splits.count("test") == 2 and splits.count("val") == 2 and splits.count("train") == 6
    again = [Case(f"c{i}", f"p{i // 3}", "MR", {"x": None}, "lab", "") for i in range(30)]  # type: ignore[arg-type]
    assert [c.split for c in assign_patient_splits(again, 0.2, 0.2, seed=3)] == [c.split for c in cases]
