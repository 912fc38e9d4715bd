"""`evaluate` on the real BraTS 2018 cases: the reference against itself and against a dilated copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from medseg.config import load_config
from medseg.evaluation.runner import evaluate
from medseg.io import read_volume, write_mask

BRATS = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "brats18"
pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(
        not BRATS.is_dir(), reason=f"BraTS 2018 cases not found at {BRATS} (../shared/data absent)"
    ),
]
CLASS_OF_RAW = {1: 1, 2: 2, 4: 3}  # a 3-class model's output indices for BraTS labels 1, 2, 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Manifest of every BraTS case plus three prediction folders written on the reference grids:
    ``self`` (reference > 0), ``classes`` (raw labels as class indices 1..3), ``dilated``
    (reference > 0 dilated by one voxel, 6-connected)."""
    tmp = tmp_path_factory.mktemp("brats_eval")
    out = {name: tmp / name for name in ("self", "classes", "dilated")}
    for folder in out.values():
        folder.mkdir()
    rows = []
    for case_dir in sorted(p for p in BRATS.iterdir() if p.is_dir()):
        case = case_dir.name
        seg = case_dir / f"{case}_seg.nii.gz"
        ref = read_volume(seg)
        raw = np.asarray(ref.array)
        mask = raw > 0
        classes = np.zeros(raw.shape, np.uint8)
        for value, cls in CLASS_OF_RAW.items():
            classes[raw == value] = cls
        write_mask(mask.astype(np.uint8), ref, out["self"] / f"{case}_mask.nii.gz")
        write_mask(classes, ref, out["classes"] / f"{case}_mask.nii.gz")
        write_mask(
            ndimage.binary_dilation(mask).astype(np.uint8), ref, out["dilated"] / f"{case}_mask.nii.gz"
        )
        rows.append(
            {
                "case_id": case,
                "patient_id": case,
                "modality": "MR",
                "image_flair": str(case_dir / f"{case}_flair.nii.gz"),
                "label": str(seg),
                "split": "test",
            }
        )
    out["manifest"] = tmp / "manifest.csv"
    pd.DataFrame(rows).to_csv(out["manifest"], index=False)
    return out


def test_reference_against_itself(folders: dict[str, Path], tmp_path: Path) -> None:
    summary = evaluate(folders["self"], folders["manifest"], tmp_path, load_config(), progress=False)
    per_case = pd.read_csv(tmp_path / "metrics_per_case.csv")
    assert len(per_case) == summary["n_cases"] >= 1
    assert (per_case.dice == 1.0).all() and (per_case.hd95_mm == 0.0).all()
    assert (per_case.lesion_f1 == 1.0).all() and (per_case["ap_iou_0.5"] == 1.0).all()
    region = summary["per_region"]["lesion"]
    assert region["voxel"]["global_dice"] == 1.0
    assert (
        region["lesion"]["pooled"]["f1"] == 1.0 and region["lesion"]["pooled"]["n_ref"] >= summary["n_cases"]
    )
    assert summary["map"]["at_iou_threshold"] == 1.0 and summary["map"]["mean_over_thresholds"] == 1.0
    assert region["slices"]["sensitivity"] == 1.0 and region["slices"]["specificity"] == 1.0


def test_brats_regions_against_class_prediction(folders: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "evaluation.regions.whole_tumour={reference_values: [1, 2, 4], prediction_values: [1, 2, 3]}",
            "evaluation.regions.tumour_core={reference_values: [1, 4], prediction_values: [1, 3]}",
            "evaluation.regions.enhancing={reference_values: [4], prediction_values: [3]}",
            "evaluation.surface_distances=false",
        ],
    )
    summary = evaluate(folders["classes"], folders["manifest"], tmp_path, cfg, progress=False)
    per_case = pd.read_csv(tmp_path / "metrics_per_case.csv")
    assert sorted(per_case.region.unique()) == ["enhancing", "tumour_core", "whole_tumour"]
    assert (per_case.dice == 1.0).all() and per_case.hd95_mm.isna().all()
    assert summary["map"]["at_iou_threshold"] == 1.0

    # without prediction_values every region compares against prediction > 0: core and enhancing
    # then see the whole tumour as predicted, so only whole_tumour keeps Dice 1
    cfg_binary = load_config(None, ["evaluation.regions={whole_tumour: [1, 2, 4], enhancing: [4]}"])
    evaluate(folders["classes"], folders["manifest"], tmp_path / "binary", cfg_binary, progress=False)
    binary = pd.read_csv(tmp_path / "binary" / "metrics_per_case.csv").set_index("region")
    assert (binary.loc["whole_tumour", "dice"] == 1.0).all()
    assert (binary.loc["enhancing", "dice"] < 1.0).all()


def test_dilated_prediction(folders: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_config(None, ["evaluation.matching=overlap"])
    summary = evaluate(folders["dilated"], folders["manifest"], tmp_path, cfg, progress=False)
    per_case = pd.read_csv(tmp_path / "metrics_per_case.csv")
    assert (per_case.dice < 1.0).all() and (per_case.dice > 0.5).all()
    assert (per_case.pred_volume_ml > per_case.ref_volume_ml).all()
    assert (per_case.recall == 1.0).all() and (per_case.precision < 1.0).all()
    assert (per_case.hd95_mm > 0.0).all()
    region = summary["per_region"]["lesion"]
    # every reference lesion still overlaps the dilated prediction: lesion recall stays 1
    assert region["lesion"]["pooled"]["recall"] == 1.0 and region["lesion"]["pooled"]["fn"] == 0
    assert region["voxel"]["global_dice"] < 1.0
    assert region["slices"]["sensitivity"] == 1.0
