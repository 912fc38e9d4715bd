"""The pipeline's stages, one record each (:data:`STAGES`, in pipeline order).

A stage is a function ``run(ctx, options)`` over the shared :class:`~.state.RunContext`, with
its options model (the stage's entry in the pipeline file, validated when the file is read)
and the folder it writes under the run folder (its output fingerprint decides whether the
stages after it are up to date). A stage whose results later stages use also has ``remember``
(what goes into its ``state.json`` record) and ``restore`` (what a skipped, up-to-date stage
hands on from that record). Adding a stage means writing its function and options model here
and adding one :class:`Stage` record to :data:`STAGES` at its place in the order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field, ValidationError

from medseg import atomic
from medseg.config import Config, ConfigError, StrictModel, dump_config, format_validation_error
from medseg.errors import MedsegError
from medseg.manifest import read_manifest
from medseg.outputs import (
    BEST_CHECKPOINT,
    CANDIDATES_CHOICE,
    CANDIDATES_TABLE,
    CASE_STATS,
    CV_CHOSEN_DIR,
    CV_SUMMARY,
    CV_TABLE,
    EVAL_SUMMARY,
    FAILURES_FILE,
    LAST_CHECKPOINT,
    MODEL_RECORD,
    PROVENANCE,
    QC_RECORD,
    RUN_CONFIG,
    predicted_case_ids,
    prob_file,
)
from medseg.pipeline.pacs_stages import (
    PacsPullOptions,
    PacsPushOptions,
    remember_pacs_pull,
    remember_pacs_push,
    stage_pacs_pull,
    stage_pacs_push,
)
from medseg.pipeline.state import STATE_FILE, RunContext

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- options


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
    cross-validation pool, none held out for test). Layout ``dicom`` with ``pipeline.model`` or
    ``pipeline.checkpoint`` set takes the channel names and modality from that model (as
    ``medseg import dicom --model``); refused series are recorded in the run's failures."""

    layout: Literal["brats", "nnunet", "files", "dicom"] = "brats"
    modality: Literal["MR", "CT"] | None = None
    images: str | None = None
    labels: str | None = None  # files: glob of label files; dicom: seg | rtstruct (label objects paired by UIDs)
    select: str | None = None  # dicom with labels: regular expression on segment labels / ROI names
    # dicom: channel name of one-series rows (default: the pipeline's model's, else "image"),
    # NAME=REGEX rules for multi-channel study rows, and keying an empty PatientID on the study
    channel: str | None = None
    series: list[str] = Field(default_factory=list)
    allow_missing_patient_id: bool = False
    val_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    seed: int = 0


class PlanOptions(StrictModel):
    """``medseg plan``: derive the config from the data (:mod:`medseg.auto.planning`). The pipeline's
    config overrides (``--set section.key=value``) are applied on top of the plan.
    ``measure``: size the epochs from the planned model's training steps timed on this machine
    (``false``: the assumed throughput of :mod:`medseg.auto.planning`)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    minutes_per_fold: float | None = Field(default=None, gt=0.0)
    measure: bool = True


class SplitOptions(StrictModel):
    """Restrict a stage to the manifest rows of one split (``None`` = all rows)."""

    split: Literal["train", "val", "test"] | None = None


class InferOptions(SplitOptions):
    tta: bool | None = None
    write_prob: bool | None = None
    output_format: Literal["nifti", "dicom-seg", "both"] | None = None


class NoOptions(StrictModel):
    pass


class StatsReportOptions(StrictModel):
    """``group_by``: a manifest column (e.g. ``site``, ``scanner``, ``timepoint``) whose groups'
    lesion-distribution curves share one figure (``--set stage.stats_report.group_by=site``)."""

    group_by: str | None = None


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
    """Write ``import/manifest.csv`` from ``pipeline.source`` (see ImportOptions)."""
    from medseg import importers
    from medseg.manifest import assign_patient_splits, write_manifest

    if not ctx.source:
        log.info("import: no pipeline.source; using the manifest %s as it is", ctx.manifest)
        return
    source = ctx.source
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
        if opts.labels is not None and opts.labels not in ("seg", "rtstruct"):
            raise ConfigError("stage import, layout dicom: labels is seg, rtstruct or unset (not a glob)")
        model = ctx.model_dir or ctx.checkpoint
        result = importers.import_dicom(source, labels=opts.labels, label_dir=ctx.stage_dir("import") / "labels",
                                        select=opts.select, series_dir=ctx.stage_dir("import") / "dicom_series",
                                        channel=opts.channel, model=model if opts.channel is None else None,
                                        series=opts.series, modality=opts.modality,
                                        allow_missing_patient_id=opts.allow_missing_patient_id)
        for refusal in result.refusals:
            log.warning("import: refused %s: %s", refusal.what, refusal.error)
            ctx.failures.append({"case_id": refusal.what, "stage": "import", "error": refusal.error})
        if not result.cases:
            raise MedsegError(f"{source}: no usable CT/MR DICOM series ({len(result.refusals)} refused, listed above)")
        cases = result.cases
    assign_patient_splits(cases, val_fraction=opts.val_fraction, test_fraction=opts.test_fraction, seed=opts.seed)
    ctx.manifest = write_manifest(cases, ctx.stage_dir("import") / "manifest.csv")
    read_manifest(ctx.manifest)
    log.info("import: %d case(s) from %s into %s", len(cases), source, ctx.manifest)


def restore_import(ctx: RunContext, record: dict[str, Any]) -> None:
    if record.get("manifest"):
        ctx.manifest = Path(record["manifest"])


def stage_plan(ctx: RunContext, opts: PlanOptions) -> None:
    """Derive the config from the data (``plan/plan.yaml``, ``plan/fingerprint.json``); the
    pipeline's ``--set`` config overrides then apply on top of it."""
    from medseg.auto.planning import plan_dataset

    out = ctx.stage_dir("plan")
    plan = plan_dataset(ctx.manifest, out / "plan.yaml", device=opts.device, minutes_per_fold=opts.minutes_per_fold,
                        progress=ctx.progress, measure=opts.measure)  # fmt: skip
    for line in plan.rules:
        log.info("plan: %s", line)
    restore_plan(ctx, {})


def restore_plan(ctx: RunContext, record: dict[str, Any]) -> None:
    from medseg.config import load_config

    ctx.cfg = load_config(ctx.run_dir / "plan" / "plan.yaml", ctx.config_overrides)
    with atomic.atomic_path(ctx.run_dir / RUN_CONFIG) as tmp:
        dump_config(ctx.cfg, tmp)


def stage_cv(ctx: RunContext, opts: NoOptions) -> None:
    """k-fold cross-validation over the pool (:mod:`medseg.auto.cross_validation`): fold models,
    out-of-fold predictions, ``cv/cv_table.csv`` and ``cv/cv_summary.json``."""
    from medseg.auto.candidate_runs import run_candidates
    from medseg.auto.cross_validation import run_cross_validation

    run = run_candidates if ctx.cfg.cv.candidates else run_cross_validation
    result = run(ctx.cfg, ctx.manifest, ctx.stage_dir("cv"), progress=ctx.progress)
    ctx.failures += result.failures
    dice = result.summary.get("metrics", {}).get("dice", {})
    log.info("cv: out-of-fold mean Dice %.4f over %s case(s)", dice.get("mean", float("nan")), dice.get("n"))


def stage_postprocess(ctx: RunContext, opts: NoOptions) -> None:
    """Choose the post-processing on the out-of-fold predictions and assemble the model folder
    ``model/`` (:mod:`medseg.auto.model_folder`): fold checkpoints, plan, folds, rule, evidence."""
    from medseg.auto.candidate_runs import chosen_models
    from medseg.auto.candidates import candidate_dir, read_choice
    from medseg.auto.cross_validation import OOF_DIR, evaluate_postprocessed
    from medseg.auto.folds import FOLDS_FILE, cv_pool
    from medseg.auto.model_folder import FINGERPRINT_FILE, write_model_folder
    from medseg.auto.postprocess_selection import select_postprocessing, write_selection
    from medseg.review import calibrate_on_cv

    cv_dir = ctx.run_dir / "cv"
    if not (cv_dir / CV_SUMMARY).is_file():
        raise ConfigError(f"stage postprocess needs the cv stage's results (cv/{CV_SUMMARY}); add a cv stage before it")
    model_dir = ctx.stage_dir("model")
    oof = cv_dir / OOF_DIR
    cases = [c for c in cv_pool(ctx.cases()) if prob_file(oof, c.case_id).is_file()]
    selection = select_postprocessing(cases, oof, ctx.cfg, progress=ctx.progress)
    written = write_selection(selection, model_dir)
    log.info("postprocess: %s", selection.reason)
    chosen_cfg = ctx.cfg.model_copy(deep=True)
    chosen_cfg.inference = chosen_cfg.inference.model_copy(update=selection.chosen)
    chosen = evaluate_postprocessed(chosen_cfg, cv_dir, cases, model_dir / CV_CHOSEN_DIR, progress=ctx.progress)
    config_file = ctx.run_dir / RUN_CONFIG
    n_folds = json.loads((cv_dir / FOLDS_FILE).read_text(encoding="utf-8"))["n_folds"]
    dice = chosen.get("metrics", {}).get("dice", {})
    hd95 = chosen.get("metrics", {}).get("hd95_mm", {})
    models, names = chosen_models(cv_dir, n_folds, ctx.cfg.cv.repeats)
    shipped = dict(selection.chosen)
    candidates = read_choice(cv_dir)
    if candidates is not None:  # the chosen candidate's config is the model's record, with its mirroring
        config_file = candidate_dir(cv_dir, candidates["chosen"][0]) / RUN_CONFIG
        shipped["tta"] = bool(candidates["tta"])
    # the QC score's calibration on the shipped rule's out-of-fold Dice: the review list at inference
    atomic.write_json(model_dir / QC_RECORD, calibrate_on_cv(cases, oof, model_dir / CV_CHOSEN_DIR / CV_TABLE))
    fingerprint = ctx.run_dir / "plan" / FINGERPRINT_FILE  # the plan's dataset fingerprint: part of the model's identity
    evidence = [cv_dir / CV_TABLE, cv_dir / CV_SUMMARY, *([fingerprint] if fingerprint.is_file() else [])]
    if candidates is not None:
        evidence += [cv_dir / CANDIDATES_CHOICE, cv_dir / CANDIDATES_TABLE]
    write_model_folder(
        model_dir, models, config_file, cv_dir / FOLDS_FILE, shipped, names=names, extra_files=evidence,
        summary={"cv_mean_dice": dice.get("mean"), "cv_mean_hd95_mm": hd95.get("mean"), "n_cases": dice.get("n"),
                 "n_folds": n_folds, "repeats": ctx.cfg.cv.repeats, "postprocess_reason": selection.reason,
                 "candidates": None if candidates is None else {k: candidates[k] for k in ("chosen", "tta", "reasons")},
                 "evidence": sorted(p.name for p in written.values())},
    )  # fmt: skip
    ctx.model_dir = model_dir


def restore_postprocess(ctx: RunContext, record: dict[str, Any]) -> None:
    if (ctx.run_dir / "model" / MODEL_RECORD).is_file():
        ctx.model_dir = ctx.run_dir / "model"


def stage_stats(ctx: RunContext, opts: SplitOptions) -> None:
    from medseg.labels import require_listed_foreground
    from medseg.stats.dataset import compute_dataset_stats, write_dataset_stats

    cases = ctx.cases(opts.split)
    stats = compute_dataset_stats(cases, ctx.cfg, progress=ctx.progress)
    require_listed_foreground(stats.cases, cases, ctx.cfg.data.labels, "manifest")
    write_dataset_stats(stats, ctx.cfg, ctx.stage_dir("stats"), title="Reference lesion distribution")
    ctx.failures += stats.failures.to_dict("records")


def stage_stats_report(ctx: RunContext, opts: StatsReportOptions) -> None:
    """The lesion statistics report without a model (:mod:`medseg.report.stats_page`), from the stats
    stage's files; with ``group_by``, the groups' curves overlaid in one figure."""
    from medseg.manifest_groups import case_groups
    from medseg.report.stats_page import StatsReportInputs, write_stats_report

    stats_dir = ctx.run_dir / "stats"
    if not (stats_dir / CASE_STATS).is_file():
        raise ConfigError(f"stage stats_report needs the stats stage's results (stats/{CASE_STATS}); add a stats stage before it")
    cases = ctx.cases()
    groups = None
    if opts.group_by:
        groups = case_groups(cases, opts.group_by, ctx.manifest, option=f"stage.stats_report.group_by={opts.group_by}")
    inputs = StatsReportInputs(stats_dir, cases, title=f"Lesion statistics — {ctx.name}", group_by=opts.group_by,
                               groups=groups, axis=ctx.cfg.stats.axis, extent=ctx.cfg.stats.extent,
                               provenance={"manifest": str(ctx.manifest), "config": ctx.cfg.model_dump(mode="json")})
    write_stats_report(inputs, ctx.stage_dir("stats_report"))


def stage_train(ctx: RunContext, opts: NoOptions) -> None:
    """Train on the manifest's train split, validate on val; resumes an interrupted run exactly."""
    from medseg.engine.trainer import train

    out = ctx.stage_dir("train")
    cfg = ctx.cfg.model_copy(deep=True)
    cfg.data.manifest = str(ctx.manifest)
    result = train(cfg, out, resume=(out / LAST_CHECKPOINT).is_file(), progress=ctx.progress)
    best = out / BEST_CHECKPOINT
    ctx.checkpoint = best if best.is_file() else out / LAST_CHECKPOINT
    log.info("train: %d epoch(s), best val Dice %.4f at epoch %d (%s)", result.epochs_done, result.best_metric,
             result.best_epoch, result.stop_reason)


def stage_infer(ctx: RunContext, opts: InferOptions) -> None:
    """Predict the manifest's cases (of ``split``) with the trained or given checkpoint.

    Inference settings are the checkpoint's, overridden by the ``inference`` keys set in this
    pipeline's config and by the stage options. Finished cases are skipped on a re-run.
    The config inference used (:func:`effective_config`) becomes the run's config from here on:
    ``ctx.cfg``, the run's ``config.yaml`` and what the report shows.
    """
    from medseg.inference.bundle import merge_settings
    from medseg.inference.cases import cases_from_manifest
    from medseg.inference.runner import inference_patch, load_bundle, run_inference

    stage_options = opts.model_dump(include={"tta", "write_prob", "output_format"}, exclude_none=True)
    if ctx.model_dir is not None:  # the fold ensemble with its rule, under the user's own --set inference.*
        from medseg.inference.bundle import load_model_folder

        user = inference_patch([o for o in ctx.config_overrides if o.startswith("inference.")])
        bundle = load_model_folder(ctx.model_dir, merge_settings(user, stage_options))
    elif ctx.checkpoint is not None:  # the inference keys this pipeline's config sets explicitly
        explicit = ctx.cfg.inference.model_dump(mode="json", include=ctx.cfg.inference.model_fields_set)
        bundle = load_bundle([ctx.checkpoint], settings=merge_settings(explicit, stage_options))
    else:
        raise ConfigError("stage infer needs a model: add a train or cv + postprocess stage, or set 'checkpoint:' / "
                          "'model:' in the pipeline (--set pipeline.checkpoint=PATH or pipeline.model=DIR)")
    use_config(ctx, effective_config(ctx.cfg, bundle.config))
    if opts.split is not None and not ctx.cases(opts.split):
        log.info("infer: no manifest row has split %r; nothing to predict", opts.split)
        ctx.stage_dir("predictions")
        return
    cases = cases_from_manifest(ctx.manifest, bundle.channels, bundle.modality, opts.split)
    summary = run_inference(cases, bundle, ctx.stage_dir("predictions"), show_progress=ctx.progress)
    ctx.failures += [{"case_id": case_id, "stage": "infer", "error": error} for case_id, error in summary.failures]


MODEL_SECTIONS = ("preprocess", "model", "train", "inference")  # what a checkpoint fixes, as inference loads it


def effective_config(user: Config, loaded: Config) -> Config:
    """The config a prediction ran with: ``user`` (the pipeline's resolved config) with the
    :data:`MODEL_SECTIONS` of ``loaded``, the inference bundle's config (the checkpoint's
    preprocess/model/train sections, its inference settings under the model folder's rule, the
    user's ``--set inference.*`` and the stage options). Data, statistics, evaluation and
    cross-validation sections stay the user's."""
    return user.model_copy(update={k: getattr(loaded, k).model_copy(deep=True) for k in MODEL_SECTIONS})


def use_config(ctx: RunContext, cfg: Config) -> None:
    """Make ``cfg`` the run's config: ``ctx.cfg`` (the stages after this one, and their
    fingerprints) and the run's ``config.yaml``."""
    ctx.cfg = cfg
    dump_config(cfg, ctx.run_dir / RUN_CONFIG)


def remember_infer(ctx: RunContext) -> dict[str, Any]:
    return {"config": ctx.cfg.model_dump(mode="json")}


def restore_infer(ctx: RunContext, record: dict[str, Any]) -> None:
    """The config the skipped infer stage ran with (its record's), so that the stages after it
    see, and are fingerprinted with, the same config as when it ran."""
    if not isinstance(record.get("config"), dict):  # a record of an older medseg: the run's config stays
        return
    try:
        use_config(ctx, Config.model_validate(record["config"]))
    except ValidationError as exc:
        log.warning("infer: the recorded config no longer validates (%s); the run's config stays the pipeline's",
                    format_validation_error(f"{STATE_FILE} (infer)", exc))


def stage_evaluate(ctx: RunContext, opts: SplitOptions) -> None:
    """Evaluate the predicted cases (of ``split``) against their labels (:func:`medseg.evaluation.runner.evaluate`).

    A labelled case without a prediction failed at inference and is recorded there, so it is
    left out here rather than recorded a second time; a case that fails evaluation is recorded
    with stage ``evaluate`` and the others go on.
    """
    from medseg.evaluation.runner import EvaluationError, evaluate

    pred_dir = ctx.run_dir / "predictions"
    cases = [c for c in ctx.cases(opts.split) if c.label is not None]
    if not cases:
        log.info("evaluate: no labelled manifest row%s; nothing to evaluate", f" in split {opts.split!r}" if opts.split else "")
        ctx.stage_dir("evaluate")
        return
    done = predicted_case_ids(pred_dir)
    failed_before = {f["case_id"] for f in ctx.failures if f.get("stage") == "infer"}
    missing = [c.case_id for c in cases if c.case_id not in done or c.case_id in failed_before]
    if missing:  # failed at inference: recorded there; evaluate the others
        log.warning("evaluate: %d case(s) have no prediction (see %s): %s", len(missing), FAILURES_FILE, missing[:5])
    out = ctx.stage_dir("evaluate")
    predicted = [c for c in cases if c.case_id not in missing]
    try:
        summary = evaluate(pred_dir, ctx.manifest, out, ctx.cfg, progress=ctx.progress, cases=predicted)
    except EvaluationError as exc:  # no case could be evaluated: each is recorded, the report goes on without
        log.warning("evaluate: %s", exc)
        failed = pd.read_csv(out / FAILURES_FILE, dtype=str, keep_default_na=False).to_dict("records")
    else:
        failed = summary["failures"]
    ctx.failures += [{"case_id": f["case_id"], "stage": "evaluate", "error": f["error"]} for f in failed]


def stage_prediction_stats(ctx: RunContext, opts: NoOptions) -> None:
    """The lesion statistics and distribution curve of the predicted masks (``predictions/``),
    as ``stats`` computes them for the reference labels."""
    from medseg.stats.dataset import compute_dataset_stats, prediction_cases, write_dataset_stats

    pred_dir = ctx.run_dir / "predictions"
    out = ctx.stage_dir("prediction_stats")
    predicted = prediction_cases(ctx.cases(), pred_dir) if pred_dir.is_dir() else []
    if not predicted:
        log.info("prediction_stats: no predicted mask in %s; nothing to measure", pred_dir)
        return
    # the masks are the model's answers, measured as they are: the checks that a *reference* label
    # is a lesion mask (not an image, not mostly foreground) do not apply to them
    cfg = ctx.cfg.model_copy(deep=True)
    cfg.data.labels = cfg.data.labels.model_copy(update={"max_foreground_fraction": None, "max_distinct_values": None})
    stats = compute_dataset_stats(predicted, cfg, progress=ctx.progress)
    write_dataset_stats(stats, ctx.cfg, out, title="Predicted lesion distribution")
    ctx.failures += [{**f, "stage": "prediction_stats"} for f in stats.failures.to_dict("records")]


def stage_report(ctx: RunContext, opts: NoOptions) -> None:
    from medseg.report.html import ReportInputs, write_report

    pred_dir = ctx.run_dir / "predictions"
    cases = ctx.cases()
    pred_stats_dir = ctx.run_dir / "prediction_stats"
    pred_stats_dir = pred_stats_dir if (pred_stats_dir / CASE_STATS).is_file() else None
    provenance_file = ctx.run_dir / PROVENANCE
    provenance = json.loads(provenance_file.read_text(encoding="utf-8")) if provenance_file.is_file() else {}
    provenance["config"] = ctx.cfg.model_dump(mode="json")
    stats_dir = ctx.run_dir / "stats"
    eval_dir = ctx.run_dir / "evaluate"
    cv_dir = ctx.run_dir / "cv"
    model_dir = ctx.run_dir / "model"
    inputs = ReportInputs(
        title=f"medseg report — {ctx.name}",
        cases=cases,
        ref_stats_dir=stats_dir if stats_dir.is_dir() else None,
        pred_stats_dir=pred_stats_dir,
        eval_dir=eval_dir if (eval_dir / EVAL_SUMMARY).is_file() else None,
        pred_dir=pred_dir if pred_dir.is_dir() else None,
        provenance=provenance,
        axis=ctx.cfg.stats.axis,
        extent=ctx.cfg.stats.extent,
        cv_dir=cv_dir if (cv_dir / CV_SUMMARY).is_file() else None,
        model_dir=model_dir if (model_dir / MODEL_RECORD).is_file() else None,
    )
    write_report(inputs, ctx.stage_dir("report"))


# --------------------------------------------------------------------------- what later stages use


def remember_import(ctx: RunContext) -> dict[str, Any]:
    return {"manifest": str(ctx.manifest)}


def remember_train(ctx: RunContext) -> dict[str, Any]:
    return {"checkpoint": str(ctx.checkpoint)} if ctx.checkpoint is not None else {}


def restore_train(ctx: RunContext, record: dict[str, Any]) -> None:
    if record.get("checkpoint"):
        ctx.checkpoint = Path(record["checkpoint"])


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline, all the runner needs to know about it.

    ``run(ctx, options)`` does the work, ``options`` parsed with the ``options`` model.
    ``output``: the folder it writes under the run folder (fingerprinted; ``None``: none there).
    ``restore(ctx, record)``: when the stage is up to date and skipped, hand on to ``ctx`` what
    its ``state.json`` record holds; ``remember(ctx)``: the fields it adds to that record after
    running (a ``status`` of ``incomplete`` there makes the stage run again next time, e.g. a
    PACS that was down). ``reads_manifest``/``reads_source``: whether the manifest's bytes /
    ``pipeline.source`` are part of its input fingerprint. ``description``: one line for
    ``medseg run --list-stages`` and docs/pipelines.md.
    """

    run: Callable[[RunContext, Any], None]
    options: type[StrictModel]
    output: str | None
    restore: Callable[[RunContext, dict[str, Any]], None] | None = None
    remember: Callable[[RunContext], dict[str, Any]] | None = None
    reads_manifest: bool = True
    reads_source: bool = False
    description: str = ""


# pipeline order: a pipeline file lists its stages in this order (each optional)
STAGES: dict[str, Stage] = {
    "synth": Stage(stage_synth, SynthOptions, None, reads_manifest=False,  # creates the manifest
                   description="generate the demo's synthetic phantoms and manifest (skipped when its files exist)"),
    "import": Stage(stage_import, ImportOptions, None, restore_import, remember_import, reads_manifest=False,
                    reads_source=True,
                    description="write the manifest from the dataset folder pipeline.source (brats, nnunet, files, dicom)"),
    "pacs_pull": Stage(stage_pacs_pull, PacsPullOptions, "pacs_pull", restore_import, remember_pacs_pull,
                       reads_manifest=False,  # creates the manifest
                       description="query the PACS (config pacs:), retrieve new series, import them as the manifest"),
    "validate": Stage(stage_validate, NoOptions, "validate",
                      description="check the manifest and its files; manifest_summary.json (cases, channels, splits)"),
    "plan": Stage(stage_plan, PlanOptions, "plan", restore_plan,
                  description="derive the config from the data (plan.yaml, fingerprint.json); --set applies on top"),
    "stats": Stage(stage_stats, SplitOptions, "stats",
                   description="per-slice / per-case lesion statistics and the lesion-distribution curve of the labels"),
    "stats_report": Stage(stage_stats_report, StatsReportOptions, "stats_report",
                          description="HTML report of the lesion statistics, no model (group_by: groups' curves overlaid)"),
    "train": Stage(stage_train, NoOptions, "train", restore_train, remember_train,
                   description="train one model on the train split, validated on val (resumes exactly)"),
    "cv": Stage(stage_cv, NoOptions, "cv",
                description=f"k-fold cross-validation: fold models, out-of-fold predictions, {CV_TABLE}, {CV_SUMMARY}"),
    "postprocess": Stage(stage_postprocess, NoOptions, "model", restore_postprocess,
                         description="choose the post-processing on the out-of-fold predictions; the model folder model/"),
    "infer": Stage(stage_infer, InferOptions, "predictions", restore_infer, remember_infer,
                   description="predict the manifest's cases (of split) with the model folder or the checkpoint"),
    "pacs_push": Stage(stage_pacs_push, PacsPushOptions, None, remember=remember_pacs_push,
                       description="store each predicted DICOM SEG in the PACS, never twice (pacs_ledger.csv)"),
    "evaluate": Stage(stage_evaluate, SplitOptions, "evaluate",
                      description="voxel and lesion-wise metrics of the predicted cases against their labels"),
    "prediction_stats": Stage(stage_prediction_stats, NoOptions, "prediction_stats",
                              description="lesion statistics and lesion-distribution curve of the predicted masks"),
    "report": Stage(stage_report, NoOptions, "report",
                    description="the HTML report: data, curves, CV accuracy, metrics, overlays, provenance"),
}
