"""Patient-level k-fold assignment: deterministic, balanced, test rows excluded, stored and checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.auto.folds import FOLDS_FILE, assign_folds, cv_pool, load_or_create_folds, read_folds
from medseg.errors import ConfigError, ManifestError
from medseg.manifest import Case


def _cases(n_patients: int, cases_per_patient: int = 1, test: tuple[int, ...] = (), unlabelled: tuple[int, ...] = ()) -> list[Case]:
    out = []
    for p in range(n_patients):
        for c in range(cases_per_patient):
            split = "test" if p in test else ("val" if p % 4 == 0 else "train")
            label = None if p in unlabelled else Path(f"/data/p{p}_{c}_seg.nii.gz")
            out.append(Case(f"case_{p:02d}_{c}", f"patient_{p:02d}", "MR", {"flair": Path(f"/data/p{p}_{c}.nii.gz")},
                            label, split))  # fmt: skip
    return out


def test_every_pool_patient_in_exactly_one_fold_and_balanced():
    cases = _cases(12, cases_per_patient=2, test=(3, 7), unlabelled=(5,))
    folds = assign_folds(cases, 4, seed=0)
    held = [p for group in folds.patients for p in group]
    pool_patients = {c.patient_id for c in cases if c.split != "test" and c.label is not None}
    assert sorted(held) == sorted(pool_patients)  # each exactly once; test and unlabelled patients out
    assert len(pool_patients) == 9 and sorted(len(g) for g in folds.patients) == [2, 2, 2, 3]
    for k in range(4):
        train, val = folds.split(cases, k)
        assert {c.patient_id for c in train}.isdisjoint({c.patient_id for c in val})
        assert {c.patient_id for c in val} == set(folds.patients[k])
        assert all(c.split != "test" and c.label is not None for c in train + val)
        # both cases of a patient travel together
        for c in val:
            assert sum(o.patient_id == c.patient_id for o in val) == 2
    assert sorted(c.case_id for k in range(4) for c in folds.split(cases, k)[1]) == sorted(c.case_id for c in cv_pool(cases))


def test_deterministic_and_seed_dependent():
    cases = _cases(20)
    a, b = assign_folds(cases, 5, seed=0), assign_folds(list(reversed(cases)), 5, seed=0)
    assert a == b  # row order does not matter
    assert assign_folds(cases, 5, seed=1).patients != a.patients


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(ManifestError, match="needs at least 5 patients"):
        assign_folds(_cases(4), 5, manifest="m.csv")


def test_fold_out_of_range():
    folds = assign_folds(_cases(6), 3)
    with pytest.raises(ConfigError, match="folds are 0..2"):
        folds.split(_cases(6), 3)


def test_stored_folds_are_reused_and_a_changed_pool_is_refused(tmp_path):
    cases = _cases(10)
    first = load_or_create_folds(tmp_path, cases, 5, 0)
    record = json.loads((tmp_path / FOLDS_FILE).read_text())
    assert [f["patients"] for f in record["folds"]] == [list(g) for g in first.patients]
    assert record["folds"][0]["case_ids"] == sorted(c.case_id for c in folds_held(first, cases, 0))
    assert read_folds(tmp_path / FOLDS_FILE) == first
    assert load_or_create_folds(tmp_path, cases, 5, 0) == first
    with pytest.raises(ConfigError, match="do not match"):
        load_or_create_folds(tmp_path, _cases(11), 5, 0)
    with pytest.raises(ConfigError, match="do not match"):
        load_or_create_folds(tmp_path, cases, 4, 0)
    (tmp_path / FOLDS_FILE).write_text("{broken")
    with pytest.raises(ConfigError, match="not a readable fold assignment"):
        read_folds(tmp_path / FOLDS_FILE)


def folds_held(folds, cases, k):
    return folds.split(cases, k)[1]
