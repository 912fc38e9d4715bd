"""The stage registry (medseg.pipeline.STAGES): every record complete and consistent, and the
evaluate stage counting a case that failed at inference once."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pandas as pd
import pytest
from pydantic import BaseModel

from medseg.config import Config, StrictModel
from medseg.errors import ConfigError
from medseg.manifest import read_manifest
from medseg.outputs import mask_file
from medseg.pipeline import STAGES, RunContext, SplitOptions, Stage, load_pipeline
from medseg.pipeline.stages import stage_evaluate


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_record_is_complete(name):
    stage = STAGES[name]
    assert isinstance(stage, Stage)
    assert callable(stage.run) and list(inspect.signature(stage.run).parameters) == ["ctx", "opts"]
    assert issubclass(stage.options, StrictModel)
    stage.options()  # every option has a default: a stage can be listed without options
    assert stage.output is None or (stage.output and "/" not in stage.output)
    for hook in (stage.restore, stage.remember):
        assert hook is None or callable(hook)


def test_stage_output_folders_are_distinct():
    outputs = [s.output for s in STAGES.values() if s.output is not None]
    assert len(outputs) == len(set(outputs))


def test_registry_order_is_the_pipeline_order(tmp_path):
    (tmp_path / "m.csv").write_text("")
    text = "name: p\nmanifest: m.csv\nstages:\n" + "".join(f"  - {n}\n" for n in STAGES)
    (tmp_path / "p.yaml").write_text(text)
    spec, _, _ = load_pipeline(tmp_path / "p.yaml")
    assert [s.name for s in spec.stages] == list(STAGES)
    assert all(isinstance(s.parsed_options(), BaseModel) for s in spec.stages)
    (tmp_path / "bad.yaml").write_text("name: p\nmanifest: m.csv\nstages:\n  - evaluat\n")
    with pytest.raises(ConfigError, match="unknown stage 'evaluat'; the stages are synth, import"):
        load_pipeline(tmp_path / "bad.yaml")


def test_evaluate_leaves_out_a_case_that_failed_at_inference(tmp_path, phantom_manifest):
    manifest = phantom_manifest(3, (40, 36, 12), seed=2, val_fraction=0.0, test_fraction=0.0)
    cases = read_manifest(manifest)
    run_dir = tmp_path / "run"
    pred = run_dir / "predictions"
    pred.mkdir(parents=True)
    for case in cases[1:]:  # the first failed at inference: no prediction
        mask_file(pred, case.case_id).write_bytes(Path(case.label).read_bytes())
    ctx = RunContext(run_dir, "p", Config(), manifest, progress=False,
                     failures=[{"case_id": cases[0].case_id, "stage": "infer", "error": "boom"}])
    stage_evaluate(ctx, SplitOptions())
    assert ctx.failures == [{"case_id": cases[0].case_id, "stage": "infer", "error": "boom"}]
    summary = json.loads((run_dir / "evaluate" / "summary.json").read_text())
    assert summary["case_ids"] == [c.case_id for c in cases[1:]] and summary["n_failed"] == 0
    assert pd.read_csv(run_dir / "evaluate" / "failures.csv").empty
    assert not list((run_dir / "evaluate").glob("*manifest*"))  # no subset manifest any more
