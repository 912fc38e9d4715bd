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
``--set`` config overrides still apply on top), ``stats``, ``train`` (one model on the
train/val split), ``cv`` (k-fold cross-validation, :mod:`medseg.cross_validation`),
``postprocess`` (rule chosen on the out-of-fold predictions + the model folder ``model/``),
``infer`` (the model folder if there is one, else the trained/given checkpoint), ``evaluate``,
``report``. Overrides: ``section.key=value`` (config), ``pipeline.<field>=value``,
``stage.<stage>.<option>=value``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from medseg import __version__, atomic
from medseg.atomic import sha256_file
from medseg.config import (
    Config,
    ConfigError,
    StrictModel,
    dump_config,
    format_validation_error,
    parse_override,
)
from medseg.errors import MedsegError
from medseg.manifest import Case, read_manifest
from medseg.outputs import EVAL_SUMMARY, FAILURES_FILE, predicted_case_ids, prob_file
from medseg.text_input import NotTextError, read_user_text, yaml_problem

log = logging.getLogger(__name__)

StageName = Literal["synth", "import", "validate", "plan", "stats", "train", "cv", "postprocess", "infer", "evaluate",
                    "report"]


# --------------------------------------------------------------------------- definitions


class SynthOptions(StrictModel):
    """Generate the demo phantoms (skipped when the manifest's files all exist)."""

    n: int = Field(default=12, ge=1)
    seed: int = 0
    modality: Literal["MR", "CT"] = "MR"
    shape: tuple[int, int, int] = (128, 128, 40)
    out: str = "demo_data"


class ImportOptions(StrictModel):
    """Write the manifest from the dataset folder ``pipeline.source`` (``medseg import LAYOUT``).

    Without ``pipeline.source`` the stage uses ``pipeline.manifest`` as it is. Splits are
    assigned per patient with ``val_fraction``/``test_fraction`` (default: every patient in the
    cross-validation pool, none held out for test)."""

    layout: Literal["brats", "nnunet", "files", "dicom"] = "brats"
    modality: Literal["MR", "CT"] | None = None
    images: str | None = None
    labels: str | None = None
    val_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    seed: int = 0


class PlanOptions(StrictModel):
    """``medseg plan``: derive the config from the data (:mod:`medseg.planning`). The pipeline's
    config overrides (``--set section.key=value``) are applied on top of the plan."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    minutes_per_fold: float | None = Field(default=None, gt=0.0)


class SplitOptions(StrictModel):
    """Restrict a stage to the manifest rows of one split (``None`` = all rows)."""

    split: Literal["train", "val", "test"] | None = None


class InferOptions(SplitOptions):
    tta: bool | None = None
    write_prob: bool | None = None


class NoOptions(StrictModel):
    pass


STAGE_OPTIONS: dict[str, type[StrictModel]] = {
    "synth": SynthOptions,
    "import": ImportOptions,
    "validate": NoOptions,
    "plan": PlanOptions,
    "stats": SplitOptions,
    "train": NoOptions,
    "cv": NoOptions,
    "postprocess": NoOptions,
    "infer": InferOptions,
    "evaluate": SplitOptions,
    "report": NoOptions,
}


class StageSpec(StrictModel):
    name: StageName
    options: dict[str, Any] = Field(default_factory=dict)

    def parsed_options(self) -> StrictModel:
        return STAGE_OPTIONS[self.name].model_validate(self.options)


class PipelineSpec(StrictModel):
    """A pipeline file (see the module docstring)."""

    name: str
    description: str = ""
    config: str | None = None
    manifest: str | None = None
    source: str | None = None
    checkpoint: str | None = None
    model: str | None = None
    config_overrides: list[str] = Field(default_factory=list)
    stages: list[StageSpec]

    @field_validator("checkpoint")
    @classmethod
    def _local_checkpoint(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"checkpoint file not found: {value}")
        return value

    @field_validator("model")
    @classmethod
    def _local_model(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"model folder not found: {value}")
        return value

    @model_validator(mode="after")
    def _data_given(self) -> PipelineSpec:
        imports = any(s.name == "import" for s in self.stages)
        if self.manifest is None and not (imports and self.source):
            raise ValueError("set 'manifest:' (or --set pipeline.manifest=CSV), or an import stage with "
                             "--set pipeline.source=DATASET_FOLDER")
        return self

    @field_validator("stages", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        """Accept ``- stats`` and ``- infer: {split: test}`` besides ``{name: ..., options: ...}``."""
        out = []
        for item in value or []:
            if isinstance(item, str):
                out.append({"name": item})
            elif isinstance(item, dict) and len(item) == 1 and "name" not in item:
                (name, options), = item.items()
                out.append({"name": name, "options": options or {}})
            else:
                out.append(item)
        return out

    @field_validator("stages")
    @classmethod
    def _valid_order(cls, stages: list[StageSpec]) -> list[StageSpec]:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"a stage appears twice: {names}")
        order = list(STAGE_OPTIONS)
        if names != sorted(names, key=order.index):
            raise ValueError(f"stages must follow the order {order}; got {names}")
        for stage in stages:
            try:
                stage.parsed_options()
            except ValidationError as exc:
                raise ValueError(format_validation_error(f"stage {stage.name} options", exc)) from None
        return stages


PATH_FIELDS = ("config", "manifest", "source", "checkpoint", "model")


def _set_stage_option(tree: dict[str, Any], key: str, value: Any, path: str | Path) -> None:
    """``stage.<name>.<option>=value``: set one option of a stage of the pipeline file."""
    parts = key.split(".")
    if len(parts) != 3:
        raise ConfigError(f"override {key!r}: stage options are set as stage.<stage>.<option>=value")
    _, name, option = parts
    stages = tree.get("stages") or []
    for i, item in enumerate(stages):
        if item == name:
            stages[i] = {name: {option: value}}
            return
        if isinstance(item, dict) and name in item:
            item[name] = {**(item[name] or {}), option: value}
            return
    raise ConfigError(f"override {key!r}: {path} has no stage {name!r}")


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> tuple[PipelineSpec, Config, Path]:
    """Read a pipeline file and its config; ``overrides`` ``key=value`` go to the config, except
    ``pipeline.<field>=...`` (e.g. ``pipeline.manifest=hospital.csv``, ``pipeline.checkpoint=...``)
    and ``stage.<stage>.<option>=...`` (e.g. ``stage.plan.minutes_per_fold=10``).

    Paths in the pipeline file are resolved against its folder; paths given as overrides
    against the current directory. Returns (spec with absolute paths, config, pipeline path).
    """
    from medseg.config import load_config

    p = Path(path).resolve()
    if not p.is_file():
        raise ConfigError(f"{path}: pipeline file not found")
    try:
        tree = yaml.safe_load(read_user_text(p)) or {}
    except NotTextError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {yaml_problem(exc)}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for key in PATH_FIELDS:
        if tree.get(key):
            tree[key] = str((p.parent / tree[key]).resolve())
    config_overrides = []
    for text in overrides or []:
        key, value = parse_override(text)
        if key.startswith("stage."):
            _set_stage_option(tree, key, value, path)
        elif key.startswith("pipeline."):
            field_name = key.split(".", 1)[1]
            tree[field_name] = str(Path(value).resolve()) if field_name in PATH_FIELDS and value else value
        else:
            config_overrides.append(text)
    tree["config_overrides"] = config_overrides  # kept: a plan stage re-applies them over its config
    synth = next((s for s in tree.get("stages", []) if isinstance(s, dict) and "synth" in s), None)
    if synth and isinstance(synth.get("synth"), dict) and synth["synth"].get("out"):
        synth["synth"]["out"] = str((p.parent / synth["synth"]["out"]).resolve())
    try:
        spec = PipelineSpec.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(path), exc)) from None
    cfg = load_config(spec.config, config_overrides)
    return spec, cfg, p


# --------------------------------------------------------------------------- run state


@dataclass
class RunContext:
    """What stages share: the run folder, resolved config, manifest and results so far."""

    run_dir: Path
    spec: PipelineSpec
    cfg: Config
    manifest: Path
    progress: bool = True
    checkpoint: Path | None = None
    model_dir: Path | None = None
    failures: list[dict] = field(default_factory=list)

    def cases(self, split: str | None = None) -> list[Case]:
        cases = read_manifest(self.manifest)
        return [c for c in cases if split is None or c.split == split]

    def stage_dir(self, name: str) -> Path:
        d = self.run_dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d


def _hash_text(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def output_fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of every file under ``folder``."""
    if not folder.exists():
        return "missing"
    entries = sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                     for f in folder.rglob("*") if f.is_file() and ".partial" not in f.name)
    return _hash_text(entries)


# --------------------------------------------------------------------------- stages


def stage_synth(ctx: RunContext, opts: SynthOptions) -> None:
    from medseg.synth import generate_dataset

    if ctx.manifest.is_file():
        try:
            read_manifest(ctx.manifest)
            log.info("synth: %s and its files exist, nothing to generate", ctx.manifest)
            return
        except MedsegError:
            pass
    generate_dataset(opts.out, n_cases=opts.n, modality=opts.modality, shape=opts.shape, seed=opts.seed,
                     manifest_path=ctx.manifest)


def stage_validate(ctx: RunContext, opts: NoOptions) -> None:
    cases = read_manifest(ctx.manifest)
    summary = {
        "cases": len(cases),
        "channels": cases[0].channels,
        "modalities": sorted({c.modality for c in cases}),
        "splits": {s or "unassigned": sum(c.split == s for c in cases) for s in ("train", "val", "test", "")},
        "labelled": sum(c.label is not None for c in cases),
    }
    atomic.write_json(ctx.stage_dir("validate") / "manifest_summary.json", summary)
    log.info("manifest: %s", summary)


def stage_import(ctx: RunContext, opts: ImportOptions) -> None:
    """Write ``import/manifest.csv`` from ``pipeline.source`` (module docstring of ImportOptions)."""
    from medseg import importers
    from medseg.manifest import assign_patient_splits, write_manifest

    if not ctx.spec.source:
        log.info("import: no pipeline.source; using the manifest %s as it is", ctx.manifest)
        return
    source = ctx.spec.source
    if opts.layout == "brats":
        cases = importers.import_brats(source, modality=opts.modality or "MR")
    elif opts.layout == "nnunet":
        cases = importers.import_nnunet(source, modality=opts.modality)
    elif opts.layout == "files":
        if not opts.images or not opts.modality:
            raise ConfigError("stage import, layout files: set images (a glob under pipeline.source) and modality")
        cases = importers.import_files(str(Path(source) / opts.images), str(Path(source) / opts.labels) if opts.labels else None,
                                       modality=opts.modality)  # fmt: skip
    else:
        cases = importers.import_dicom(source)
    assign_patient_splits(cases, val_fraction=opts.val_fraction, test_fraction=opts.test_fraction, seed=opts.seed)
    ctx.manifest = write_manifest(cases, ctx.stage_dir("import") / "manifest.csv")
    read_manifest(ctx.manifest)
    log.info("import: %d case(s) from %s into %s", len(cases), source, ctx.manifest)


def _restore_import(ctx: RunContext, record: dict[str, Any]) -> None:
    if record.get("manifest"):
        ctx.manifest = Path(record["manifest"])


def stage_plan(ctx: RunContext, opts: PlanOptions) -> None:
    """Derive the config from the data (``plan/plan.yaml``, ``plan/fingerprint.json``); the
    pipeline's ``--set`` config overrides then apply on top of it."""
    from medseg.planning import plan_dataset

    out = ctx.stage_dir("plan")
    plan = plan_dataset(ctx.manifest, out / "plan.yaml", device=opts.device, minutes_per_fold=opts.minutes_per_fold,
                        progress=ctx.progress)  # fmt: skip
    for line in plan.rules:
        log.info("plan: %s", line)
    _restore_plan(ctx, {})


def _restore_plan(ctx: RunContext, record: dict[str, Any]) -> None:
    from medseg.config import load_config

    ctx.cfg = load_config(ctx.run_dir / "plan" / "plan.yaml", ctx.spec.config_overrides)
    with atomic.atomic_path(ctx.run_dir / "config.yaml") as tmp:
        dump_config(ctx.cfg, tmp)


def stage_cv(ctx: RunContext, opts: NoOptions) -> None:
    """k-fold cross-validation over the pool (:mod:`medseg.cross_validation`): fold models,
    out-of-fold predictions, ``cv/cv_table.csv`` and ``cv/cv_summary.json``."""
    from medseg.cross_validation import run_cross_validation

    result = run_cross_validation(ctx.cfg, ctx.manifest, ctx.stage_dir("cv"), progress=ctx.progress)
    ctx.failures += result.failures
    dice = result.summary.get("metrics", {}).get("dice", {})
    log.info("cv: out-of-fold mean Dice %.4f over %s case(s)", dice.get("mean", float("nan")), dice.get("n"))


def stage_postprocess(ctx: RunContext, opts: NoOptions) -> None:
    """Choose the post-processing on the out-of-fold predictions and assemble the model folder
    ``model/`` (:mod:`medseg.model_folder`): fold checkpoints, plan, folds, rule, evidence."""
    from medseg.cross_validation import (
        CV_SUMMARY,
        CV_TABLE,
        OOF_DIR,
        evaluate_postprocessed,
        fold_models,
    )
    from medseg.folds import FOLDS_FILE, cv_pool
    from medseg.model_folder import write_model_folder
    from medseg.postprocess_selection import select_postprocessing, write_selection

    cv_dir = ctx.run_dir / "cv"
    if not (cv_dir / CV_SUMMARY).is_file():
        raise ConfigError("stage postprocess needs the cv stage's results (cv/cv_summary.json); add a cv stage before it")
    model_dir = ctx.stage_dir("model")
    oof = cv_dir / OOF_DIR
    cases = [c for c in cv_pool(ctx.cases()) if prob_file(oof, c.case_id).is_file()]
    selection = select_postprocessing(cases, oof, ctx.cfg, progress=ctx.progress)
    written = write_selection(selection, model_dir)
    log.info("postprocess: %s", selection.reason)
    chosen_cfg = ctx.cfg.model_copy(deep=True)
    chosen_cfg.inference = chosen_cfg.inference.model_copy(update=selection.chosen)
    chosen = evaluate_postprocessed(chosen_cfg, cv_dir, cases, model_dir / "cv_chosen", progress=ctx.progress)
    config_file = ctx.run_dir / "config.yaml"
    n_folds = json.loads((cv_dir / FOLDS_FILE).read_text(encoding="utf-8"))["n_folds"]
    dice = chosen.get("metrics", {}).get("dice", {})
    hd95 = chosen.get("metrics", {}).get("hd95_mm", {})
    write_model_folder(
        model_dir, fold_models(cv_dir, n_folds), config_file, cv_dir / FOLDS_FILE, selection.chosen,
        extra_files=[cv_dir / CV_TABLE, cv_dir / CV_SUMMARY],
        summary={"cv_mean_dice": dice.get("mean"), "cv_mean_hd95_mm": hd95.get("mean"), "n_cases": dice.get("n"),
                 "n_folds": n_folds, "postprocess_reason": selection.reason,
                 "evidence": sorted(p.name for p in written.values())},
    )  # fmt: skip
    ctx.model_dir = model_dir


def _restore_postprocess(ctx: RunContext, record: dict[str, Any]) -> None:
    if (ctx.run_dir / "model" / "model.json").is_file():
        ctx.model_dir = ctx.run_dir / "model"


def stage_stats(ctx: RunContext, opts: SplitOptions) -> None:
    from medseg.dataset_stats import compute_dataset_stats, write_dataset_stats

    stats = compute_dataset_stats(ctx.cases(opts.split), ctx.cfg, progress=ctx.progress)
    write_dataset_stats(stats, ctx.cfg, ctx.stage_dir("stats"), title="Reference lesion distribution")
    ctx.failures += stats.failures.to_dict("records")


def stage_train(ctx: RunContext, opts: NoOptions) -> None:
    """Train on the manifest's train split, validate on val; resumes an interrupted run exactly."""
    from medseg.engine.trainer import train

    out = ctx.stage_dir("train")
    cfg = ctx.cfg.model_copy(deep=True)
    cfg.data.manifest = str(ctx.manifest)
    result = train(cfg, out, resume=(out / "last.pt").is_file(), progress=ctx.progress)
    best = out / "best.pt"
    ctx.checkpoint = best if best.is_file() else out / "last.pt"
    log.info("train: %d epoch(s), best val Dice %.4f at epoch %d (%s)", result.epochs_done, result.best_metric,
             result.best_epoch, result.stop_reason)


def stage_infer(ctx: RunContext, opts: InferOptions) -> None:
    """Predict the manifest's cases (of ``split``) with the trained or given checkpoint.

    Inference settings are the checkpoint's, overridden by the ``inference`` keys set in this
    pipeline's config and by the stage options. Finished cases are skipped on a re-run.
    """
    from medseg.inference.cases import cases_from_manifest
    from medseg.inference.runner import load_bundle, run_inference

    stage_options = [f"inference.{k}={json.dumps(v)}" for k, v in (("tta", opts.tta), ("write_prob", opts.write_prob))
                     if v is not None]  # fmt: skip
    if ctx.model_dir is not None:  # the fold ensemble with its rule, under the user's own --set inference.*
        from medseg.model_folder import read_model_folder

        model = read_model_folder(ctx.model_dir)
        user = [o for o in ctx.spec.config_overrides if o.startswith("inference.")]
        bundle = load_bundle(model.checkpoints, [*model.inference_overrides(), *user, *stage_options])
    elif ctx.checkpoint is not None:
        explicit = {k: getattr(ctx.cfg.inference, k) for k in ctx.cfg.inference.model_fields_set}
        overrides = [f"inference.{k}={json.dumps(v)}" for k, v in explicit.items()]
        bundle = load_bundle([ctx.checkpoint], [*overrides, *stage_options])
    else:
        raise ConfigError("stage infer needs a model: add a train or cv + postprocess stage, or set 'checkpoint:' / "
                          "'model:' in the pipeline (--set pipeline.checkpoint=PATH or pipeline.model=DIR)")
    if opts.split is not None and not ctx.cases(opts.split):
        log.info("infer: no manifest row has split %r; nothing to predict", opts.split)
        ctx.stage_dir("predictions")
        return
    cases = cases_from_manifest(ctx.manifest, bundle.channels, bundle.modality, opts.split)
    summary = run_inference(cases, bundle, ctx.stage_dir("predictions"), show_progress=ctx.progress)
    ctx.failures += [{"case_id": case_id, "stage": "infer", "error": error} for case_id, error in summary.failures]


def stage_evaluate(ctx: RunContext, opts: SplitOptions) -> None:
    from medseg.evaluation import EvaluationError, evaluate

    pred_dir = ctx.run_dir / "predictions"
    done = predicted_case_ids(pred_dir)
    cases = [c for c in ctx.cases(opts.split) if c.label is not None]
    if not cases:
        log.info("evaluate: no labelled manifest row%s; nothing to evaluate", f" in split {opts.split!r}" if opts.split else "")
        ctx.stage_dir("evaluate")
        return
    missing = [c.case_id for c in cases if c.case_id not in done]
    if missing:  # failed at inference: recorded there; evaluate the others
        log.warning("evaluate: %d case(s) have no prediction (see failures.csv): %s", len(missing), missing[:5])
    subset = ctx.stage_dir("evaluate") / "evaluated_manifest.csv"
    from medseg.manifest import write_manifest

    write_manifest([c for c in cases if c.case_id in done], subset)
    out = ctx.stage_dir("evaluate")
    try:
        summary = evaluate(pred_dir, subset, out, ctx.cfg, progress=ctx.progress)
    except EvaluationError as exc:  # no case could be evaluated: each is recorded, the report goes on without
        log.warning("evaluate: %s", exc)
        failed = pd.read_csv(out / FAILURES_FILE, dtype=str, keep_default_na=False).to_dict("records")
    else:
        failed = summary["failures"]
    ctx.failures += [{"case_id": f["case_id"], "stage": "evaluate", "error": f["error"]} for f in failed]


def stage_report(ctx: RunContext, opts: NoOptions) -> None:
    from medseg.dataset_stats import compute_dataset_stats, prediction_cases, write_dataset_stats
    from medseg.report_html import ReportInputs, write_report

    pred_dir = ctx.run_dir / "predictions"
    cases = ctx.cases()
    pred_stats_dir = None
    if pred_dir.is_dir():
        predicted = prediction_cases(cases, pred_dir)
        if predicted:
            stats = compute_dataset_stats(predicted, ctx.cfg, progress=False)
            pred_stats_dir = ctx.stage_dir("prediction_stats")
            write_dataset_stats(stats, ctx.cfg, pred_stats_dir, title="Predicted lesion distribution")
    provenance = json.loads((ctx.run_dir / "provenance.json").read_text(encoding="utf-8")) if (ctx.run_dir / "provenance.json").is_file() else {}
    provenance["config"] = ctx.cfg.model_dump(mode="json")
    stats_dir = ctx.run_dir / "stats"
    eval_dir = ctx.run_dir / "evaluate"
    cv_dir = ctx.run_dir / "cv"
    model_dir = ctx.run_dir / "model"
    inputs = ReportInputs(
        title=f"medseg report — {ctx.spec.name}",
        cases=cases,
        ref_stats_dir=stats_dir if stats_dir.is_dir() else None,
        pred_stats_dir=pred_stats_dir,
        eval_dir=eval_dir if (eval_dir / EVAL_SUMMARY).is_file() else None,
        pred_dir=pred_dir if pred_dir.is_dir() else None,
        provenance=provenance,
        axis=ctx.cfg.stats.axis,
        extent=ctx.cfg.stats.extent,
        cv_dir=cv_dir if (cv_dir / "cv_summary.json").is_file() else None,
        model_dir=model_dir if (model_dir / "model.json").is_file() else None,
    )
    write_report(inputs, ctx.stage_dir("report"))


STAGES: dict[str, Callable[[RunContext, Any], None]] = {
    "synth": stage_synth,
    "import": stage_import,
    "validate": stage_validate,
    "plan": stage_plan,
    "stats": stage_stats,
    "train": stage_train,
    "cv": stage_cv,
    "postprocess": stage_postprocess,
    "infer": stage_infer,
    "evaluate": stage_evaluate,
    "report": stage_report,
}
STAGE_OUTPUTS = {"synth": None, "import": None, "validate": "validate", "plan": "plan", "stats": "stats", "train": "train",
                 "cv": "cv", "postprocess": "model", "infer": "predictions", "evaluate": "evaluate", "report": "report"}
# what a skipped (up-to-date) stage hands on to the stages after it, from its state record
RESTORE: dict[str, Callable[[RunContext, dict[str, Any]], None]] = {
    "import": _restore_import,
    "plan": _restore_plan,
    "postprocess": _restore_postprocess,
}


# --------------------------------------------------------------------------- runner


def choose_run_dir(spec: PipelineSpec, out: str | None, resume: bool, root: Path = Path("runs")) -> Path:
    if out:
        return Path(out).resolve()
    base = (root / spec.name).resolve()
    if resume:
        existing = sorted(p for p in base.glob("*") if (p / "state.json").is_file())
        if existing:
            return existing[-1]
    return base / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def _versions() -> dict[str, str]:
    import platform

    import monai
    import numpy
    import torch

    return {"medseg": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "monai": monai.__version__, "numpy": numpy.__version__}


def run_pipeline(
    spec: PipelineSpec,
    cfg: Config,
    run_dir: Path,
    force: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every stage of ``spec`` into ``run_dir`` (see module docstring). Returns the state."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("medseg").addHandler(handler)
    logging.getLogger("medseg").setLevel(logging.INFO)
    try:
        return _run(spec, cfg, run_dir, force or [], progress)
    finally:
        logging.getLogger("medseg").removeHandler(handler)
        handler.close()


def _run(spec: PipelineSpec, cfg: Config, run_dir: Path, force: list[str], progress: bool) -> dict[str, Any]:
    unknown = [f for f in force if f not in [s.name for s in spec.stages]]
    if unknown:
        raise ConfigError(f"--force {unknown}: not a stage of pipeline {spec.name} ({[s.name for s in spec.stages]})")
    with atomic.atomic_path(run_dir / "config.yaml") as tmp:
        dump_config(cfg, tmp)
    atomic.write_text(run_dir / "pipeline.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    state_path = run_dir / "state.json"
    state: dict[str, Any] = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}
    manifest = Path(spec.manifest) if spec.manifest else run_dir / "import" / "manifest.csv"
    ctx = RunContext(run_dir, spec, cfg, manifest, progress, checkpoint=Path(spec.checkpoint) if spec.checkpoint else None,
                     model_dir=Path(spec.model) if spec.model else None)  # fmt: skip
    previous = json.loads((run_dir / "failures_by_stage.json").read_text(encoding="utf-8")) if (run_dir / "failures_by_stage.json").is_file() else {}
    upstream = ""
    timings: dict[str, float] = {}
    for stage in spec.stages:
        opts = stage.parsed_options()
        # synth creates the manifest: its only inputs are its options
        manifest_bytes = ctx.manifest.read_bytes() if ctx.manifest.is_file() and stage.name not in ("synth", "import") else b""
        config_json = ctx.cfg.model_dump(mode="json")  # a plan stage replaces the config for the stages after it
        fingerprint = _hash_text(stage.name, opts.model_dump(mode="json"), config_json, spec.checkpoint, spec.model,
                                 spec.source if stage.name == "import" else None,
                                 hashlib.sha256(manifest_bytes).hexdigest(), upstream)
        out_name = STAGE_OUTPUTS[stage.name]
        out_dir = run_dir / out_name if out_name else None
        record = state.get(stage.name, {})
        outputs_intact = out_dir is None or record.get("output") == output_fingerprint(out_dir)
        if record.get("fingerprint") == fingerprint and record.get("status") == "done" and outputs_intact and stage.name not in force:
            log.info("stage %s: up to date, skipped", stage.name)
            print(f"[{stage.name}] up to date (skipped)")
            ctx.failures += previous.get(stage.name, [])
            if stage.name == "train" and record.get("checkpoint"):
                ctx.checkpoint = Path(record["checkpoint"])
            if stage.name in RESTORE:
                RESTORE[stage.name](ctx, record)
            upstream = _hash_text(upstream, record.get("output"))
            timings[stage.name] = record.get("seconds", 0.0)
            continue
        print(f"[{stage.name}] running")
        log.info("stage %s: running", stage.name)
        n_fail_before = len(ctx.failures)
        start = time.perf_counter()
        STAGES[stage.name](ctx, opts)
        seconds = time.perf_counter() - start
        output = output_fingerprint(out_dir) if out_dir else "none"
        state[stage.name] = {"fingerprint": fingerprint, "status": "done", "output": output, "seconds": round(seconds, 2),
                             "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                             "runs": record.get("runs", 0) + 1}
        if stage.name == "train" and ctx.checkpoint is not None:
            state[stage.name]["checkpoint"] = str(ctx.checkpoint)
        if stage.name == "import":
            state[stage.name]["manifest"] = str(ctx.manifest)
        previous[stage.name] = ctx.failures[n_fail_before:]
        atomic.write_json(run_dir / "failures_by_stage.json", previous)
        atomic.write_json(state_path, state)
        upstream = _hash_text(upstream, output)
        timings[stage.name] = round(seconds, 2)
        log.info("stage %s: done in %.1f s", stage.name, seconds)
        _write_provenance(ctx, timings)
    _write_provenance(ctx, timings)
    failures = pd.DataFrame(ctx.failures, columns=["case_id", "stage", "error"])
    atomic.write_csv(run_dir / FAILURES_FILE, failures)
    return state


def _write_provenance(ctx: RunContext, timings: dict[str, float]) -> None:
    provenance: dict[str, Any] = {
        "pipeline": ctx.spec.name,
        "versions": _versions(),
        "manifest": str(ctx.manifest),
        "stage_seconds": timings,
        "run_dir": str(ctx.run_dir),
    }
    if ctx.checkpoint is not None and ctx.checkpoint.is_file():
        provenance["checkpoint"] = str(ctx.checkpoint)
        provenance["checkpoint_sha256"] = sha256_file(ctx.checkpoint)
    record = ctx.model_dir / "model.json" if ctx.model_dir is not None else None
    if record is not None and record.is_file():
        model = json.loads(record.read_text(encoding="utf-8"))
        provenance["model"] = str(ctx.model_dir)
        provenance["model_checkpoints_sha256"] = {c["file"]: c["sha256"] for c in model.get("checkpoints", [])}
        provenance["postprocess"] = model.get("postprocess")
    atomic.write_json(ctx.run_dir / "provenance.json", provenance)
