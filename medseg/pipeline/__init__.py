"""Run a pipeline definition (YAML in ``pipelines/``) stage by stage, resumably.

A pipeline file::

    name: demo
    description: synthetic phantoms -> statistics -> train -> infer -> evaluate -> report
    config: ../configs/demo.yaml        # base config, relative to the pipeline file
    manifest: ../data_manifest.csv      # relative to the pipeline file
    checkpoint: null                    # a trained checkpoint (infer without a train stage)
    model: null                         # or a model folder (fold ensemble + post-processing)
    source: null                        # a dataset folder the import stage reads
    stages:
      - synth: {n: 12, seed: 0, out: ../demo_data}
      - validate
      - stats
      - train
      - infer: {split: test}
      - evaluate: {split: test}
      - prediction_stats
      - report

Run folder (``runs/<name>/<timestamp>``, or ``--out``; ``--resume`` reuses the newest):
``config.yaml`` (resolved), ``pipeline.yaml`` (resolved), ``state.json`` (per stage: input
fingerprint, output fingerprint, seconds), ``provenance.json`` (versions, checkpoint sha256,
timings), ``run.log``, ``failures.csv`` (every failed case with its stage and reason), and one
folder per stage. A stage is skipped when its input fingerprint (its options, the resolved
config, the manifest's bytes and the output fingerprints of the stages before it) matches
the recorded one and its outputs still exist; ``--force STAGE`` redoes one stage (and,
through the fingerprints, whatever depends on its outputs). Stages that work per case skip
finished cases themselves (inference).

Stages, in this order (each optional): ``synth`` (demo phantoms), ``import`` (manifest from
``source``), ``validate``, ``plan`` (the config derived from the data replaces ``config``;
``--set`` config overrides still apply on top), ``stats``, ``stats_report`` (the statistics'
HTML report without a model, :mod:`medseg.report.stats_page`), ``train`` (one model on the
train/val split), ``cv`` (k-fold cross-validation, :mod:`medseg.auto.cross_validation`),
``postprocess`` (rule chosen on the out-of-fold predictions + the model folder ``model/``),
``infer`` (the model folder if there is one, else the trained/given checkpoint), ``evaluate``,
``prediction_stats`` (lesion statistics and curve of the predicted masks), ``report``. Overrides: ``section.key=value`` (config), ``pipeline.<field>=value``,
``stage.<stage>.<option>=value``. ``medseg run --list-stages`` prints them with one line each
(``Stage.description``); docs/pipelines.md lists them with their options.

Package layout: :mod:`.spec` (the pipeline file: :class:`PipelineSpec`, :func:`load_pipeline`,
overrides, :func:`choose_run_dir`), :mod:`.state` (``state.json``, fingerprints,
``failures_by_stage.json``, the :class:`RunContext` stages share), :mod:`.stages` (one
:class:`Stage` record per stage in :data:`STAGES`: function, options model, output folder,
restore hook; adding a stage is adding a record there) and :mod:`.runner` (:func:`run_pipeline`).
"""

from __future__ import annotations

from medseg.pipeline.runner import run_pipeline
from medseg.pipeline.spec import PipelineSpec, StageSpec, choose_run_dir, load_pipeline
from medseg.pipeline.stages import (
    STAGES,
    ImportOptions,
    InferOptions,
    NoOptions,
    PlanOptions,
    SplitOptions,
    Stage,
    StatsReportOptions,
    SynthOptions,
)
from medseg.pipeline.state import RunContext, output_fingerprint

__all__ = [
    "STAGES",
    "ImportOptions",
    "InferOptions",
    "NoOptions",
    "PipelineSpec",
    "PlanOptions",
    "RunContext",
    "SplitOptions",
    "Stage",
    "StageSpec",
    "StatsReportOptions",
    "SynthOptions",
    "choose_run_dir",
    "load_pipeline",
    "output_fingerprint",
    "run_pipeline",
]
