"""End-to-end through the `medseg` command: synth -> stats, bad inputs, real data."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, make_affine, make_case_files, write_nifti

from medseg.cli import main
from medseg.importers import import_files
from medseg.manifest import read_manifest, write_manifest


def test_synth_then_stats(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "data"), "--n", "4", "--shape", "48", "44", "16"]) == 0
    assert main(["stats", str(tmp_path / "data" / "data_manifest.csv"), "--out", str(tmp_path / "stats"), "--no-progress"]) == 0
    out = tmp_path / "stats"
    cases = pd.read_csv(out / "case_stats.csv")
    truth = pd.read_csv(tmp_path / "data" / "phantoms.csv")
    merged = cases.merge(truth, on="case_id", suffixes=("", "_truth"))
    assert len(merged) == 4
    assert (merged["n_lesions_3d"] == merged["n_lesions"]).all()  # known lesion count recovered
    assert (merged["lesion_voxels"] == merged["lesion_voxels_truth"]).all()
    slices = pd.read_csv(out / "slice_stats.csv")
    assert slices.groupby("case_id")["lesion_voxels"].sum().to_dict() == cases.set_index("case_id")["lesion_voxels"].to_dict()
    curve = pd.read_csv(out / "lesion_curve.csv")
    assert len(curve) == 101 and curve["position"].iloc[-1] == 1.0 and (curve["q25"] <= curve["q75"]).all()
    assert (out / "lesion_curve.png").stat().st_size > 10_000
    assert (out / "config.yaml").exists() and pd.read_csv(out / "failures.csv").empty
    assert "lesion-distribution curve" in capsys.readouterr().out


def test_synth_touching_pairs_with_instance_labels(tmp_path):
    """Touching pairs: stats (connected components) count each pair once; the label files keep
    one value per lesion (what data.labels.instances: values reads)."""
    assert main(["synth", "--out", str(tmp_path / "data"), "--n", "2", "--shape", "64", "64", "12",
                 "--touching-pairs", "1", "--instance-labels"]) == 0  # fmt: skip
    truth = pd.read_csv(tmp_path / "data" / "phantoms.csv")
    for case in read_manifest(tmp_path / "data" / "data_manifest.csv"):
        from medseg.geometry import label_components
        from medseg.io import read_volume

        label = read_volume(case.label).array
        n_truth = int(truth.set_index("case_id").loc[case.case_id, "n_lesions"])
        assert int(label.max()) == n_truth and len(set(label[label > 0].tolist())) == n_truth
        assert label_components(label > 0)[1] == n_truth - 1  # the pair is one component


def test_tracked_demo_manifest_is_what_synth_writes(tmp_path):
    """data_manifest.csv at the repo root describes exactly the phantoms `make demo` generates."""
    main(["synth", "--out", str(tmp_path / "demo_data"), "--n", "12", "--seed", "0",
          "--manifest", str(tmp_path / "data_manifest.csv")])
    assert (tmp_path / "data_manifest.csv").read_text() == (REPO / "data_manifest.csv").read_text()


def test_batch_isolates_and_names_bad_cases(tmp_path, capsys):
    good = make_case_files(tmp_path, "good", make_affine("lps"))
    corrupt = make_case_files(tmp_path, "corrupt", make_affine("ras"))
    data = corrupt["label"].read_bytes()
    corrupt["label"].write_bytes(data[: len(data) // 3])
    mismatch = make_case_files(tmp_path, "mismatch", make_affine("oblique"))
    write_nifti(mismatch["label"], np.zeros((40, 36, 13), np.uint8), make_affine("oblique"))
    four_d = make_case_files(tmp_path, "fourd", make_affine("ras"))
    write_nifti(four_d["label"], np.zeros((40, 36, 12, 2), np.uint8), make_affine("ras"))
    values = make_case_files(tmp_path, "values", make_affine("ras"))
    lab = np.zeros((40, 36, 12), np.uint8)
    lab[3, 3, 3] = 7
    write_nifti(values["label"], lab, make_affine("ras"))
    nan = make_case_files(tmp_path, "nanimg", make_affine("ras"))
    arr = np.ones((40, 36, 12), np.float32)
    arr[1, 1, 1] = np.nan
    write_nifti(nan["flair"], arr, make_affine("ras"))
    from medseg.manifest import Case

    cases = [Case(n, n, "MR", {"flair": f["flair"], "t1": f["t1"]}, f["label"], "train")
             for n, f in (("good", good), ("corrupt", corrupt), ("mismatch", mismatch), ("fourd", four_d),
                          ("values", values), ("nanimg", nan))]
    manifest = write_manifest(cases, tmp_path / "m.csv")
    code = main(["stats", str(manifest), "--out", str(tmp_path / "out"), "--no-progress",
                 "--set", "data.labels.allowed_values=[0,1]"])
    assert code == 1  # some cases failed (failures.csv), the others done
    failures = pd.read_csv(tmp_path / "out" / "failures.csv").set_index("case_id")["error"].to_dict()
    assert set(failures) == {"corrupt", "mismatch", "fourd", "values", "nanimg"}
    assert "corrupt_seg.nii.gz" in failures["corrupt"] and "truncated" in failures["corrupt"]
    assert "grid mismatch" in failures["mismatch"] and "mismatch_seg.nii.gz" in failures["mismatch"]
    assert "fourd_seg.nii.gz" in failures["fourd"] and "4-D" in failures["fourd"]
    assert "values_seg.nii.gz" in failures["values"] and "unexpected label value(s) [7]" in failures["values"]
    assert "nanimg_flair.nii.gz" in failures["nanimg"] and "NaN" in failures["nanimg"]
    assert pd.read_csv(tmp_path / "out" / "case_stats.csv")["case_id"].tolist() == ["good"]
    assert "Traceback" not in capsys.readouterr().err


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    bad_cfg = tmp_path / "c.yaml"
    bad_cfg.write_text("stats:\n  axsi: axial\n")
    (tmp_path / "m.csv").write_text("case_id,patient_id,modality,image_ct,label,split\na,a,XR,x.nii.gz,,\n")
    for args, expected in (
        (["stats", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")], "manifest file not found"),
        (["stats", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o")], "unknown modality 'XR'"),
        (["stats", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"), "--config", str(bad_cfg)], "stats.axsi: unknown key"),
    ):
        proc = subprocess.run([sys.executable, "-m", "medseg.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.real_data
def test_brats_import_and_stats_match_independent_count(tmp_path, requires_brats):
    manifest = tmp_path / "brats.csv"
    assert main(["import", "brats", str(requires_brats), "--out", str(manifest)]) == 0
    cases = read_manifest(manifest)
    assert len(cases) == 12 and cases[0].channels == ["flair", "t1ce", "t2"]
    assert {c.split for c in cases} == {"train", "val"}
    assert main(["stats", str(manifest), "--out", str(tmp_path / "stats"), "--no-progress"]) == 0
    stats = pd.read_csv(tmp_path / "stats" / "case_stats.csv").set_index("case_id")
    for case in cases:
        independent = int((np.asarray(nib.load(str(case.label)).dataobj) > 0).sum())
        assert stats.loc[case.case_id, "lesion_voxels"] == independent, case.case_id
        assert 1 <= stats.loc[case.case_id, "n_lesions_3d"] <= 20
    slices = pd.read_csv(tmp_path / "stats" / "slice_stats.csv")
    assert slices.groupby("case_id")["lesion_voxels"].sum().to_dict() == stats["lesion_voxels"].to_dict()


@pytest.mark.real_data
def test_nrrd_cases_load_through_the_same_path(tmp_path, requires_nrrd):
    cases = import_files(str(requires_nrrd / "*_image.nrrd"), str(requires_nrrd / "*_label.nrrd"), modality="MR")
    for c in cases:
        if c.case_id.startswith("lung"):
            c.modality = "CT"
    assert sorted(c.case_id for c in cases) == ["brain1", "brain2", "breast1", "lung1"]
    manifest = write_manifest(cases, tmp_path / "nrrd.csv")
    assert main(["stats", str(manifest), "--out", str(tmp_path / "stats"), "--no-progress"]) == 0
    stats = pd.read_csv(tmp_path / "stats" / "case_stats.csv").set_index("case_id")
    assert pd.read_csv(tmp_path / "stats" / "failures.csv").empty
    assert stats.loc["lung1", "lesion_voxels"] == 837 and stats.loc["lung1", "slices_with_lesion"] == 3
    import SimpleITK as sitk

    for c in cases:
        independent = int((sitk.GetArrayFromImage(sitk.ReadImage(str(c.label))) > 0).sum())
        assert stats.loc[c.case_id, "lesion_voxels"] == independent
