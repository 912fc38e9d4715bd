"""Pipeline runner: definitions, fingerprints, resume, --force, failures (no training needed)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from medseg.cli import main
from medseg.errors import ConfigError
from medseg.pipeline import load_pipeline, run_pipeline


def _pipeline(tmp_path, stages: str) -> object:
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: statsonly\n"
        "manifest: data/data_manifest.csv\n"
        "stages:\n" + stages
    )
    return path


STATS_STAGES = "  - synth: {n: 3, shape: [40, 36, 12], out: data}\n  - validate\n  - stats\n  - report\n"


def test_runs_then_skips_then_forces(tmp_path, capsys):
    path = _pipeline(tmp_path, STATS_STAGES)
    run_dir = tmp_path / "run"
    assert main(["run", str(path), "--out", str(run_dir), "--no-progress"]) == 0
    for name in ("config.yaml", "pipeline.yaml", "state.json", "provenance.json", "run.log", "failures.csv",
                 "stats/case_stats.csv", "stats/lesion_curve.csv", "report/report.html", "validate/manifest_summary.json"):
        assert (run_dir / name).exists(), name
    state = json.loads((run_dir / "state.json").read_text())
    assert all(state[s]["runs"] == 1 for s in ("synth", "validate", "stats", "report"))
    curve = pd.read_csv(run_dir / "stats" / "lesion_curve.csv")
    assert curve["n_cases"].iloc[0] == 3
    capsys.readouterr()

    assert main(["run", str(path), "--out", str(run_dir), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("up to date") == 4
    assert all(v["runs"] == 1 for v in json.loads((run_dir / "state.json").read_text()).values())

    assert main(["run", str(path), "--out", str(run_dir), "--no-progress", "--force", "stats"]) == 0
    state = json.loads((run_dir / "state.json").read_text())
    assert state["stats"]["runs"] == 2 and state["validate"]["runs"] == 1
    assert state["report"]["runs"] == 2  # its input (the stats outputs) changed

    # a config change re-runs the stages that depend on it
    assert main(["run", str(path), "--out", str(run_dir), "--no-progress", "--set", "stats.n_bins=11"]) == 0
    assert len(pd.read_csv(run_dir / "stats" / "lesion_curve.csv")) == 11
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["versions"]["medseg"] and "stats" in provenance["stage_seconds"]


def test_failing_case_is_recorded_and_run_completes(tmp_path):
    path = _pipeline(tmp_path, STATS_STAGES)
    run_dir = tmp_path / "run"
    main(["run", str(path), "--out", str(run_dir), "--no-progress"])
    label = next((tmp_path / "data").glob("phantom_001_label.nii.gz"))
    label.write_bytes(label.read_bytes()[:200])  # truncate one case's label
    assert main(["run", str(path), "--out", str(run_dir), "--no-progress", "--force", "stats"]) == 0
    failures = pd.read_csv(run_dir / "failures.csv")
    assert failures["case_id"].tolist() == ["phantom_001"] and "truncated" in failures["error"].iloc[0]
    assert len(pd.read_csv(run_dir / "stats" / "case_stats.csv")) == 2


def test_bad_pipeline_definitions(tmp_path):
    with pytest.raises(ConfigError, match="stages must follow the order"):
        load_pipeline(_pipeline(tmp_path, "  - stats\n  - validate\n"))
    with pytest.raises(ConfigError, match="stage stats options: split: Input should be"):
        load_pipeline(_pipeline(tmp_path, "  - stats: {split: training}\n"))
    with pytest.raises(ConfigError, match="unknown key"):
        load_pipeline(_pipeline(tmp_path, "  - stats: {splt: test}\n"))
    with pytest.raises(ConfigError, match="pipeline file not found"):
        load_pipeline(tmp_path / "none.yaml")
    spec, cfg, _ = load_pipeline(_pipeline(tmp_path, "  - validate\n"), ["stats.axis=coronal", "pipeline.manifest=x.csv"])
    assert cfg.stats.axis == "coronal" and spec.manifest.endswith("x.csv")
    with pytest.raises(ConfigError, match="not a stage"):
        run_pipeline(spec, cfg, tmp_path / "r", force=["train"])
