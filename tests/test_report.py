"""The HTML report from stage outputs (statistics, evaluation, predictions) and in a browser."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from browser import open_in_browser
from conftest import artifact_path
from scipy import ndimage

from medseg.config import Config
from medseg.evaluation.runner import evaluate
from medseg.io import read_volume, write_mask
from medseg.manifest import read_manifest
from medseg.report.html import ReportInputs, write_report
from medseg.stats.dataset import compute_dataset_stats, prediction_cases, write_dataset_stats


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, phantom_manifest):
    """Phantoms, predictions = reference dilated once (one case: lesions removed), stats,
    evaluation and the report."""
    tmp = tmp_path_factory.mktemp("report")
    manifest = phantom_manifest(4, (48, 44, 16), seed=3)
    cases = read_manifest(manifest)
    pred = tmp / "pred"
    for i, case in enumerate(cases):
        label = read_volume(case.label)
        mask = ndimage.binary_dilation(label.array > 0) if i else np.zeros(label.shape, bool)
        write_mask(mask.astype(np.uint8), label, pred / f"{case.case_id}_mask.nii.gz")
    cfg = Config()
    write_dataset_stats(compute_dataset_stats(cases, cfg, progress=False), cfg, tmp / "stats")
    write_dataset_stats(compute_dataset_stats(prediction_cases(cases, pred), cfg, progress=False), cfg, tmp / "pred_stats")
    evaluate(pred, manifest, tmp / "eval", cfg)
    inputs = ReportInputs("test report", cases, tmp / "stats", tmp / "pred_stats", tmp / "eval", pred,
                          {"medseg": "test", "checkpoint_sha256": "abc"})
    return write_report(inputs, tmp / "report"), cases


def test_report_lists_every_case_and_figure(report_dir):
    html_path, cases = report_dir
    text = html_path.read_text()
    for case in cases:
        assert case.case_id in text
    for section in ("Dataset", "Predicted cases", "Lesion-distribution curves", "Metrics", "Detection", "Slice overlays",
                    "Provenance"):
        assert f"<h2>{section}" in text
    assert text.count("data:image/png;base64,") >= 8  # self-contained
    pngs = sorted(p.name for p in html_path.parent.glob("*.png"))
    assert {"lesion_curve_reference.png", "lesion_curve_predicted.png", "pr_curve.png", "lesion_sizes.png",
            "recall_by_size.png", "overlay_best.png", "overlay_worst.png"} <= set(pngs)
    assert "checkpoint_sha256" in text


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    html_path, _ = report_dir
    shot = artifact_path(tmp_path, "report_screenshot.png")
    images, logs = open_in_browser(html_path, shot)
    assert len(images) >= 8
    assert all(complete and width > 0 for complete, width in images), images
    errors = [entry for entry in logs if entry.get("level") == "SEVERE"]
    assert not errors, errors
    assert shot.stat().st_size > 10_000


def test_prediction_stats_curve_matches_masks(report_dir):
    html_path, cases = report_dir
    root = html_path.parent.parent
    slices = pd.read_csv(root / "pred_stats" / "slice_stats.csv")
    for case in cases[1:]:
        mask = read_volume(root / "pred" / f"{case.case_id}_mask.nii.gz").array
        assert slices.loc[slices["case_id"] == case.case_id, "lesion_voxels"].sum() == int(mask.sum())
