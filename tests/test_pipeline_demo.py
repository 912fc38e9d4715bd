"""The demo pipeline end to end with a tiny budget, its resume after a killed inference, and
its report in a headless browser."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from browser import open_in_browser
from conftest import REPO, artifact_path

from medseg.cli import main
from medseg.manifest import read_manifest
from medseg.stats.lesions import lesion_distribution_curve

TINY = ["--set", "train.max_minutes=0.5", "--set", "train.epochs=1", "--set", "train.samples_per_epoch=32",
        "--set", "train.batch_size=8", "--set", "train.patch_size=[64,64]", "--set", "train.num_workers=0"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    text = (REPO / "pipelines" / "demo.yaml").read_text()
    text = text.replace("../configs/demo.yaml", str(REPO / "configs" / "demo.yaml"))
    text = text.replace("../data_manifest.csv", str(tmp / "data" / "data_manifest.csv"))
    text = text.replace("{n: 12, seed: 0, out: ../demo_data}", f"{{n: 6, seed: 0, shape: [64, 60, 20], out: {tmp / 'data'}}}")
    pipeline = tmp / "demo.yaml"
    pipeline.write_text(text)
    run_dir = tmp / "run"
    args = ["run", str(pipeline), "--out", str(run_dir), "--no-progress", *TINY, "--set", f"train.cache_dir={tmp / 'cache'}"]
    assert main(args) == 0
    return run_dir, args, tmp


def test_demo_writes_every_artefact_consistently(demo_run):
    run_dir, _, tmp = demo_run
    for name in ("config.yaml", "pipeline.yaml", "state.json", "provenance.json", "run.log", "failures.csv",
                 "stats/slice_stats.csv", "stats/case_stats.csv", "stats/lesion_curve.csv", "stats/lesion_curve.png",
                 "train/best.pt", "evaluate/summary.json", "evaluate/metrics_per_case.csv", "report/report.html"):
        assert (run_dir / name).is_file(), name
    cases = read_manifest(tmp / "data" / "data_manifest.csv")
    test_ids = [c.case_id for c in cases if c.split == "test"]
    assert test_ids
    for case_id in test_ids:
        for suffix in ("_mask.nii.gz", "_lesions.csv", "_lesions.nii.gz"):
            assert (run_dir / "predictions" / f"{case_id}{suffix}").is_file()
    html = (run_dir / "report" / "report.html").read_text(encoding="utf-8")
    assert all(c.case_id in html for c in cases)  # the overview lists every case
    metrics = pd.read_csv(run_dir / "evaluate" / "metrics_per_case.csv")
    assert sorted(metrics["case_id"]) == sorted(test_ids)
    # the curve CSV is the aggregate of the per-slice statistics
    slices = pd.read_csv(run_dir / "stats" / "slice_stats.csv")
    curve = pd.read_csv(run_dir / "stats" / "lesion_curve.csv")
    again, _ = lesion_distribution_curve(slices, len(curve))
    # (from the tables' digits: areas to 0.01 mm2, positions to 1e-4; the curve's mean to 1e-4)
    np.testing.assert_allclose(curve["mean"], again["mean"], rtol=1e-3, atol=0.01)
    case_stats = pd.read_csv(run_dir / "stats" / "case_stats.csv").set_index("case_id")
    assert slices.groupby("case_id")["lesion_voxels"].sum().to_dict() == case_stats["lesion_voxels"].to_dict()
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert len(provenance["checkpoint_sha256"]) == 64 and provenance["versions"]["torch"]
    assert set(provenance["stage_seconds"]) == {"synth", "validate", "stats", "train", "infer", "evaluate", "prediction_stats", "report"}


def test_killed_inference_resumes_without_redoing_finished_work(demo_run):
    run_dir, args, _ = demo_run
    pred = run_dir / "predictions"
    markers = sorted(pred.glob("*_complete.json"))
    assert len(markers) >= 2
    before = {m.name: m.stat().st_mtime_ns for m in markers}
    # what a run killed in the middle of the last case leaves: no marker, a half-written file,
    # and no 'done' record for the infer stage and after
    victim = markers[-1].name[: -len("_complete.json")]
    markers[-1].unlink()
    (pred / f"{victim}_mask.nii.gz").write_bytes(b"\x1f\x8b half")
    (pred / f".{victim}_mask.partial-999.nii.gz").write_bytes(b"\x1f\x8b partial")
    state = json.loads((run_dir / "state.json").read_text())
    for stage in ("infer", "evaluate", "report"):
        state.pop(stage)
    (run_dir / "state.json").write_text(json.dumps(state))

    assert main(args) == 0
    after = json.loads((run_dir / "state.json").read_text())
    assert all(after[s]["runs"] == 1 for s in ("synth", "validate", "stats", "train"))  # not redone
    assert after["infer"]["runs"] == 1 and after["infer"]["status"] == "done"
    for name, mtime in before.items():
        if not name.startswith(victim):
            assert (pred / name).stat().st_mtime_ns == mtime, f"{name} was redone"
    assert (pred / f"{victim}_complete.json").is_file()
    from medseg.io import read_volume

    assert read_volume(pred / f"{victim}_mask.nii.gz").array.dtype == np.uint8  # rewritten, readable
    assert not list(pred.glob(".*partial*"))


def test_demo_report_in_headless_chromium(demo_run, tmp_path):
    run_dir, _, _ = demo_run
    images, logs = open_in_browser(run_dir / "report" / "report.html", artifact_path(tmp_path, "demo_report.png"))
    assert len(images) >= 6 and all(complete and width > 0 for complete, width in images)
    assert not [e for e in logs if e.get("level") == "SEVERE"]
