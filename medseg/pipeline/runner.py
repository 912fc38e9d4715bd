"""Run a pipeline stage by stage into its run folder: skip the stages that are up to date, run
the others (:data:`~.stages.STAGES`), record state, failures and provenance (layout in
:mod:`medseg.pipeline`)."""

from __future__ import annotations

import copy
import datetime as dt
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from medseg import __version__, atomic
from medseg.atomic import sha256_file
from medseg.auto.model_folder import CV_SUMMARY_FILES, FINGERPRINT_FILE, model_identity
from medseg.config import Config, ConfigError, dump_config
from medseg.errors import NothingToDo
from medseg.logs import log_to_file
from medseg.outputs import FAILURES_FILE, MODEL_RECORD, PROVENANCE, RUN_CONFIG, RUN_LOG
from medseg.pipeline.spec import PipelineSpec
from medseg.pipeline.stages import STAGES
from medseg.pipeline.state import (
    RunContext,
    hash_text,
    manifest_files_identity,
    output_fingerprint,
    read_failures_by_stage,
    read_state,
    stage_fingerprint,
    write_failures_by_stage,
    write_state,
)

log = logging.getLogger(__name__)


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
    """Run every stage of ``spec`` into ``run_dir`` (see :mod:`medseg.pipeline`). Returns the state."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with log_to_file(run_dir / RUN_LOG):  # every INFO line, the libraries' too (the console shows medseg's)
        return _run(spec, cfg, run_dir, force or [], progress)


def _run(spec: PipelineSpec, cfg: Config, run_dir: Path, force: list[str], progress: bool) -> dict[str, Any]:
    unknown = [f for f in force if f not in [s.name for s in spec.stages]]
    if unknown:
        raise ConfigError(f"--force {unknown}: not a stage of pipeline {spec.name} ({[s.name for s in spec.stages]})")
    with atomic.atomic_path(run_dir / RUN_CONFIG) as tmp:
        dump_config(cfg, tmp)
    atomic.write_text(run_dir / "pipeline.yaml", yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    state = read_state(run_dir)
    manifest = Path(spec.manifest) if spec.manifest else run_dir / "import" / "manifest.csv"
    ctx = RunContext(run_dir, spec.name, cfg, manifest, list(spec.config_overrides), spec.source, progress,
                     checkpoint=Path(spec.checkpoint) if spec.checkpoint else None,
                     model_dir=Path(spec.model) if spec.model else None)  # fmt: skip
    previous = read_failures_by_stage(run_dir)
    upstream = ""
    timings: dict[str, float] = {}
    files_identity: dict[bytes, list[Any]] = {}  # manifest bytes -> its files' identity, taken once a run
    for entry in spec.stages:
        name, stage, opts = entry.name, STAGES[entry.name], entry.parsed_options()
        manifest_bytes = ctx.manifest.read_bytes() if ctx.manifest.is_file() and stage.reads_manifest else b""
        manifest_files = None
        if manifest_bytes:
            if manifest_bytes not in files_identity:
                files_identity[manifest_bytes] = manifest_files_identity(ctx.manifest)
            manifest_files = files_identity[manifest_bytes]
        config_json = ctx.cfg.model_dump(mode="json")  # a plan stage replaces the config for the stages after it
        fingerprint = stage_fingerprint(name, opts.model_dump(mode="json"), config_json, spec.checkpoint, spec.model,
                                        spec.source if stage.reads_source else None, manifest_bytes, upstream,
                                        manifest_files)
        out_dir = run_dir / stage.output if stage.output else None
        record = state.get(name, {})
        outputs_intact = out_dir is None or record.get("output") == output_fingerprint(out_dir)
        if record.get("fingerprint") == fingerprint and record.get("status") == "done" and outputs_intact and name not in force:
            log.info("stage %s: up to date, skipped", name)
            print(f"[{name}] up to date (skipped)")
            ctx.failures += previous.get(name, [])
            if stage.restore is not None:
                stage.restore(ctx, record)
            upstream = hash_text(upstream, record.get("output"))
            timings[name] = record.get("seconds", 0.0)
            continue
        print(f"[{name}] running")
        log.info("stage %s: running", name)
        n_fail_before = len(ctx.failures)
        start = time.perf_counter()
        try:
            stage.run(ctx, opts)
        except NothingToDo as exc:  # the run ends here, successfully; the stage runs again next time
            print(f"[{name}] nothing to do: {exc}")
            log.info("stage %s: nothing to do (%s); the stages after it are not run", name, exc)
            break
        seconds = time.perf_counter() - start
        output = output_fingerprint(out_dir) if out_dir else "none"
        remembered = stage.remember(ctx) if stage.remember is not None else {}
        status = remembered.pop("status", "done")  # "incomplete": the stage runs again next time (e.g. a PACS down)
        state[name] = {"fingerprint": fingerprint, "status": status, "output": output, "seconds": round(seconds, 2),
                       "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                       "runs": record.get("runs", 0) + 1, **remembered}  # fmt: skip
        previous[name] = ctx.failures[n_fail_before:]
        write_failures_by_stage(run_dir, previous)
        write_state(run_dir, state)
        upstream = hash_text(upstream, output)
        timings[name] = round(seconds, 2)
        log.info("stage %s: done in %.1f s", name, seconds)
        _write_provenance(ctx, timings)
    _write_provenance(ctx, timings)
    failures = pd.DataFrame(ctx.failures, columns=["case_id", "stage", "error"])
    atomic.write_csv(run_dir / FAILURES_FILE, failures)
    return state


def _write_provenance(ctx: RunContext, timings: dict[str, float]) -> None:
    """``provenance.json``: versions, manifest, stage timings and the model the run uses:
    ``model_identity`` (:func:`medseg.auto.model_folder.model_identity`: checkpoint files with sha256,
    for a model folder the dataset fingerprint's sha256 and the cross-validated accuracy), the
    model folder's when there is one (inference prefers it), else the checkpoint's. The older
    keys (``checkpoint_sha256``, ``model_checkpoints_sha256``, ``postprocess``) stay."""
    provenance: dict[str, Any] = {
        "pipeline": ctx.name,
        "versions": _versions(),
        "manifest": str(ctx.manifest),
        "stage_seconds": timings,
        "run_dir": str(ctx.run_dir),
    }
    if ctx.checkpoint is not None and ctx.checkpoint.is_file():
        provenance["checkpoint"] = str(ctx.checkpoint)
        provenance["checkpoint_sha256"] = sha256_file(ctx.checkpoint)
        provenance["model_identity"] = _model_identity((ctx.checkpoint,), None)
    record = ctx.model_dir / MODEL_RECORD if ctx.model_dir is not None else None
    if record is not None and record.is_file():
        model = json.loads(record.read_text(encoding="utf-8"))
        provenance["model"] = str(ctx.model_dir)
        provenance["model_checkpoints_sha256"] = {c["file"]: c["sha256"] for c in model.get("checkpoints", [])}
        provenance["postprocess"] = model.get("postprocess")
        files = tuple(ctx.model_dir / c["file"] for c in model.get("checkpoints", []))
        provenance["model_identity"] = _model_identity(files, ctx.model_dir)
    atomic.write_json(ctx.run_dir / PROVENANCE, provenance)


def _model_identity(checkpoints: tuple[Path, ...], folder: Path | None) -> dict[str, Any]:
    """:func:`~medseg.auto.model_folder.model_identity`, hashed once per version of the files (the
    provenance is rewritten after every stage; an ensemble's checkpoints take seconds to hash)."""
    def stamp(path: Path) -> tuple[str, int, int]:
        info = path.stat() if path.exists() else None
        return (str(path), info.st_size if info else -1, info.st_mtime_ns if info else -1)

    folder_files = [folder / MODEL_RECORD, folder / FINGERPRINT_FILE, *(folder / n for n in CV_SUMMARY_FILES)] if folder else []
    key = (tuple(stamp(p) for p in checkpoints), str(folder), tuple(stamp(p) for p in folder_files))
    return copy.deepcopy(_cached_identity(key, checkpoints, folder))


@functools.lru_cache(maxsize=8)
def _cached_identity(key: tuple, checkpoints: tuple[Path, ...], folder: Path | None) -> dict[str, Any]:
    return model_identity(checkpoints, folder)
