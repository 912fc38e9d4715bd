"""nnU-Net v2 raw-dataset export (medseg.nnunet_export) and the peer benchmark's budget arithmetic.

The export is checked by reading it back with medseg's own importer (``import_nnunet``) and
comparing voxels and grids with the sources; the splits against the fold assignment's patients;
the schedule against the budget by recomputing its duration by hand. No nnunetv2 needed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_affine, make_case_files, write_nifti

from medseg.atomic import write_json
from medseg.auto.folds import assign_folds
from medseg.config import LabelConfig
from medseg.errors import ConfigError, InputFileError, MedsegError
from medseg.importers import import_nnunet
from medseg.io import read_volume
from medseg.manifest import Case, read_manifest
from medseg.nnunet_export import export_nnunet, nnunet_splits, write_splits

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _budget_module():
    """benchmarks/peer_budget.py (benchmarks/ is not a package: loaded from its file)."""
    if "peer_budget" not in sys.modules:
        spec = importlib.util.spec_from_file_location("peer_budget", BENCHMARKS / "peer_budget.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["peer_budget"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["peer_budget"]


@pytest.fixture(scope="module")
def phantoms(phantom_manifest) -> list[Case]:
    """Three MR phantoms (two channels): RAS, LPS and oblique storage, anisotropic spacing."""
    return read_manifest(phantom_manifest(3, (40, 40, 10), seed=3))


def _nib(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


@pytest.mark.parametrize("link", ["symlink", "copy"])
def test_export_round_trips_through_the_importer(tmp_path, phantoms, link):
    dataset = export_nnunet(phantoms, tmp_path, 7, "Phantoms", LabelConfig(), link=link)
    assert dataset == tmp_path / "Dataset007_Phantoms"
    spec = json.loads((dataset / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": phantoms[0].channels[0], "1": phantoms[0].channels[1]}
    assert spec["labels"] == {"background": 0, "lesion": 1} and spec["numTraining"] == 3
    assert spec["file_ending"] == ".nii.gz"
    back = {c.case_id: c for c in import_nnunet(dataset)}
    assert sorted(back) == sorted(c.case_id for c in phantoms)
    for case in phantoms:
        again = back[case.case_id]
        assert again.channels == case.channels and again.modality == "MR" and again.label is not None
        for channel in case.channels:
            src, src_affine = _nib(case.images[channel])
            out, out_affine = _nib(again.images[channel])
            assert (dataset / "imagesTr").is_dir() and np.array_equal(src, out) and src.dtype == out.dtype
            np.testing.assert_allclose(out_affine, src_affine, atol=1e-5)
        ref, ref_affine = _nib(case.label)
        label, label_affine = _nib(again.label)
        assert set(np.unique(label)) == {0, 1} and label.dtype == np.uint8
        assert np.array_equal(label, (ref > 0).astype(np.uint8))
        np.testing.assert_allclose(label_affine, ref_affine, atol=1e-5)
    oblique = read_volume(back[phantoms[2].case_id].images[phantoms[2].channels[0]])
    assert not np.allclose(np.abs(oblique.affine[:3, :3]), np.diag(oblique.spacing), atol=1e-3)  # really oblique
    assert max(oblique.spacing) / min(oblique.spacing) > 1.5  # and anisotropic


def test_labels_follow_the_label_config_and_other_formats_are_converted(tmp_path, rng):
    affine = make_affine("oblique", spacing=(0.8, 0.9, 3.5))
    files = make_case_files(tmp_path, "c1", affine, rng=rng)
    raw = np.zeros((40, 36, 12), dtype=np.int16)
    raw[2:6, 2:6, 3:5], raw[10:14, 10:14, 5:7], raw[20:24, 20:24, 7:9] = 1, 2, 4
    write_nifti(files["label"], raw, affine)
    nrrd = tmp_path / "c1_t1.nrrd"  # a channel given as NRRD: converted, grid and dtype kept
    sitk.WriteImage(sitk.ReadImage(str(files["t1"])), str(nrrd))
    case = Case("c1", "p1", "MR", {"flair": files["flair"], "t1": nrrd}, files["label"], "train")
    dataset = export_nnunet([case], tmp_path / "raw", 12, "Core", LabelConfig(foreground=[1, 4]))
    assert not (dataset / "imagesTr" / "c1_0001.nii.gz").is_symlink()
    converted = read_volume(dataset / "imagesTr" / "c1_0001.nii.gz")
    source = read_volume(files["t1"])
    assert np.array_equal(converted.array, source.array) and converted.array.dtype == source.array.dtype
    np.testing.assert_allclose(converted.affine, source.affine, atol=1e-5)
    label = read_volume(dataset / "labelsTr" / "c1.nii.gz").array
    assert np.array_equal(label, np.isin(raw, [1, 4]).astype(np.uint8))


def test_ct_channels_are_named_ct_and_stale_cases_go(tmp_path, rng):
    cases = []
    for cid in ("a", "b"):
        files = make_case_files(tmp_path, cid, make_affine("lps"), channels=("image",), rng=rng)
        cases.append(Case(cid, cid, "CT", {"image": files["image"]}, files["label"], "train"))
    dataset = export_nnunet(cases, tmp_path / "raw", 3, "Liver")
    assert json.loads((dataset / "dataset.json").read_text())["channel_names"] == {"0": "CT"}
    assert [c.modality for c in import_nnunet(dataset)] == ["CT", "CT"]
    export_nnunet(cases[:1], tmp_path / "raw", 3, "Liver")  # again with one case: b's files removed
    assert sorted(p.name for p in (dataset / "imagesTr").iterdir()) == ["a_0000.nii.gz"]
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == ["a.nii.gz"]
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 1


def test_clear_errors(tmp_path, rng):
    files = make_case_files(tmp_path, "c1", make_affine("ras"), rng=rng)
    good = Case("c1", "p1", "MR", {"flair": files["flair"], "t1": files["t1"]}, files["label"], "train")
    shifted = tmp_path / "shifted_seg.nii.gz"
    write_nifti(shifted, np.asarray(nib.load(str(files["label"])).dataobj), make_affine("ras", origin=(0, 0, 0)))
    with pytest.raises(InputFileError, match=r"shifted_seg\.nii\.gz: label grid differs"):
        export_nnunet([Case("c2", "p2", "MR", good.images, shifted, "train")], tmp_path / "r1", 1, "X")
    gone = Case("c3", "p3", "MR", {"flair": tmp_path / "nope.nii.gz", "t1": files["t1"]}, files["label"], "train")
    with pytest.raises(InputFileError, match=r"nope\.nii\.gz: file not found \(row|case c3"):
        export_nnunet([gone], tmp_path / "r2", 1, "X")
    swapped = Case("c4", "p4", "MR", {"t1": files["t1"], "flair": files["flair"]}, files["label"], "train")
    with pytest.raises(MedsegError, match="c4.*channels"):
        export_nnunet([good, swapped], tmp_path / "r3", 1, "X")
    with pytest.raises(ConfigError, match="1..999"):
        export_nnunet([good], tmp_path / "r4", 1000, "X")
    with pytest.raises(ConfigError, match="name"):
        export_nnunet([good], tmp_path / "r4", 5, "has space")
    export_nnunet([good], tmp_path / "r5", 5, "A")
    with pytest.raises(ConfigError, match="Dataset005_A"):
        export_nnunet([good], tmp_path / "r5", 5, "B")


def test_splits_equal_medseg_folds(tmp_path):
    cases = [Case(f"p{p}_s{s}", f"p{p}", "MR", {"t1": tmp_path / "x.nii.gz"}, tmp_path / "y.nii.gz", "")
             for p in range(7) for s in range(2 if p % 3 == 0 else 1)]  # fmt: skip
    cases.append(Case("held_test", "p99", "MR", {"t1": tmp_path / "x.nii.gz"}, tmp_path / "y.nii.gz", "test"))
    folds = assign_folds(cases, n_folds=3, seed=4)
    folds_json = write_json(tmp_path / "folds.json", folds.as_dict(cases))
    splits = json.loads(write_splits(folds_json, tmp_path).read_text())
    assert (tmp_path / "splits_final.json").is_file() and len(splits) == 3
    pool = {c.case_id for c in cases if c.split != "test"}
    for k, split in enumerate(splits):
        expected_val = sorted(c.case_id for c in cases if c.patient_id in folds.patients[k])
        assert split["val"] == expected_val
        assert split["train"] == sorted(pool - set(expected_val))
    assert sorted(cid for s in splits for cid in s["val"]) == sorted(pool)  # every pool case held out once
    assert nnunet_splits(folds_json) == splits


@pytest.mark.parametrize(("t", "budget", "elapsed", "t_val", "overhead", "end"), [
    (1.0, 240.0, 20.0, 0.3, 1.0, 2.0),   # a CPU fold: 10 short epochs
    (0.1, 600.0, 15.0, 0.03, 0.5, 1.0),  # a GPU fold: nnU-Net's 250-iteration epochs
    (7.0, 240.0, 30.0, 2.0, 1.5, 3.0),   # slow iterations: fewer epochs of >= 5 iterations
])  # fmt: skip
def test_schedule_ends_at_the_budget(t, budget, elapsed, t_val, overhead, end):
    pb = _budget_module()
    s = pb.fit_schedule(t, budget, elapsed_s=elapsed, sec_per_val_iteration=t_val, epoch_overhead_s=overhead,
                        end_overhead_s=end)  # fmt: skip
    def epoch(i: int) -> float:  # by hand: training + validation + bookkeeping
        return i * t + max(1, round(0.04 * i)) * t_val + overhead
    assert not s.over_budget and s.iterations_per_epoch >= pb.MIN_ITERATIONS
    assert s.val_iterations_per_epoch == max(1, round(0.04 * s.iterations_per_epoch))
    finish = elapsed + s.epochs * epoch(s.iterations_per_epoch) + end
    assert finish <= budget + 1e-9  # the last epoch (the schedule's end) is inside the budget
    assert elapsed + s.epochs * epoch(s.iterations_per_epoch + 1) + end > budget  # and as late as it can be
    assert s.seconds == pytest.approx(s.epochs * epoch(s.iterations_per_epoch))
    assert s.epochs >= min(pb.TARGET_EPOCHS, int((budget - elapsed - end) / t) // pb.MIN_ITERATIONS) or s.epochs == 1
    assert pb.poly_lr(s.epochs - 1, s.epochs) < pb.poly_lr(0, s.epochs)


def test_schedule_floor_and_refit():
    pb = _budget_module()
    s = pb.fit_schedule(100.0, 240.0)  # one iteration takes 100 s: the floor, flagged
    assert (s.epochs, s.iterations_per_epoch, s.over_budget) == (1, pb.MIN_ITERATIONS, True)
    assert "over the budget" in s.rule
    assert pb.fit_schedule(1.0, 250.0 * 20 * 1.0).iterations_per_epoch <= pb.ITERATIONS_PER_EPOCH
    # 8 iterations of 2 s + 4 s of validation and bookkeeping = 20 s per epoch; 2 s to finish
    assert pb.refit(1, 50.0, 240.0, 2.0, 4.0, 8, 2.0) == (10, 8)  # 188 s left: 9 more epochs of 8
    assert pb.refit(3, 203.0, 240.0, 2.0, 4.0, 8, 2.0) == (4, 15)  # 35 s: one more epoch, stretched to 15
    assert pb.refit(3, 223.0, 240.0, 2.0, 4.0, 8, 2.0) == (4, 5)  # 15 s: a last short epoch of 5
    assert pb.refit(3, 229.0, 240.0, 2.0, 4.0, 8, 2.0) == (3, 8)  # 9 s: stop after the epochs done
    rng = np.random.default_rng(0)
    for _ in range(200):  # whatever the speeds, the epochs planned end inside the budget
        done, n = int(rng.integers(1, 9)), int(rng.integers(5, 60))
        elapsed, t, rest = rng.uniform(0, 240), rng.uniform(0.05, 9), rng.uniform(0, 6)
        epochs, iterations = pb.refit(done, elapsed, 240.0, t, rest, n, 1.0)
        assert epochs >= done and (epochs == done or elapsed + (epochs - done) * (iterations * t + rest) + 1.0 <= 240.0)
        assert epochs == done or iterations >= min(n, pb.MIN_ITERATIONS)
    # epoch 0's learning rate does not depend on the number of epochs, so a refit after it is exact
    assert pb.poly_lr(0, 7) == pb.poly_lr(0, 13) == 1e-2
    assert pb.iterations_in_budget(0.8, 240.0) == 300
    with pytest.raises(ValueError):
        pb.fit_schedule(0.0, 100.0)
