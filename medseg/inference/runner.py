"""Checkpoints -> models + config; one case end to end; batches with resume, failures and sharding.

Per case: read + preprocess with the checkpoint's own chain (``preprocess_transforms`` of the
config stored in the checkpoint) -> ``predict_volume`` on the preprocessed (C, R, A, S) grid
-> ``Invertd`` of the probabilities onto the source grid (I, J, K) -> ``postprocess`` there ->
lesion instances and table -> atomic writes + completion marker (:mod:`.outputs`).

Batch (``run_inference``, a :class:`BatchRun`): cases whose outputs are complete are skipped; the next case is read
and preprocessed in a background thread while the current one is predicted; a failing case is
recorded (``failures.csv``: case_id, error) and the run carries on. Under ``torchrun`` (env
``RANK``/``WORLD_SIZE``) rank r takes cases r, r + W, r + 2W, ...; each rank records its
failures, and rank 0 merges them into ``failures.csv`` after a barrier (gloo process group).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from pydantic import ValidationError
from torch import nn

from medseg import __version__
from medseg.atomic import write_csv, write_json
from medseg.config import Config, InferenceConfig, format_validation_error, parse_override
from medseg.errors import ConfigError, MedsegError
from medseg.geometry import AXIS_INDEX, index_axis, label_components
from medseg.inference.cases import InferenceCase, check_case_id
from medseg.inference.lesion_table import lesion_table
from medseg.inference.outputs import CaseWriter, discard_case, expected_outputs, is_complete
from medseg.io import Geometry
from medseg.outputs import FAILURES_FILE, INFERENCE_RECORD
from medseg.prediction.postprocess import postprocess
from medseg.prediction.predictor import predict_volume, prepare_models
from medseg.preprocessing import IMAGE_KEY, channel_key, preprocess_transforms
from medseg.runtime import (
    barrier,
    join_process_group,
    keep_freed_memory,
    leave_process_group,
    resolve_device,
    set_threads,
    shard,
    torchrun_rank,
)
from medseg.transforms import apply_chain

log = logging.getLogger(__name__)

RUN_RECORD = INFERENCE_RECORD
# settings that do not change what is written (left out of the per-case fingerprint)
NEUTRAL_SETTINGS = ("batch_size", "prefetch", "threads", "keep_freed_memory")


# --------------------------------------------------------------------------- checkpoints


@dataclass
class InferenceBundle:
    """Everything fixed for a run: models (eval, on ``device``), the checkpoint's config
    (with inference overrides), its channels (input order) and modality."""

    models: list[nn.Module]
    config: Config
    channels: list[str]
    modality: str
    checkpoints: list[Path]
    device: torch.device

    @property
    def inference(self) -> InferenceConfig:
        return self.config.inference

    def fingerprint(self) -> str:
        """Hash of the checkpoints (path, size, mtime) and the output-relevant settings."""
        settings = self.inference.model_dump(mode="json", exclude=set(NEUTRAL_SETTINGS))
        files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.checkpoints]
        text = json.dumps({"checkpoints": files, "inference": settings}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def inference_patch(overrides: Sequence[str]) -> dict[str, Any]:
    """``inference.key=value`` texts (``--set``) -> ``{key: value}``, values read as YAML; other
    sections are refused (:class:`ConfigError`).

    Preprocessing and model settings come from the checkpoint and cannot be changed at
    inference (the model was trained with them).
    """
    patch: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        if section != "inference" or not name or "." in name:
            raise ConfigError(
                f"--set {text!r}: only inference.<key> can be set at inference time "
                "(preprocessing and model settings are the checkpoint's)"
            )
        patch[name] = value
    return patch


def patch_inference(cfg: InferenceConfig, patch: Mapping[str, Any]) -> InferenceConfig:
    """``cfg`` with the typed values of ``patch`` (inference keys), validated once as a whole
    (an unknown key or a bad value raises :class:`ConfigError`)."""
    try:
        return InferenceConfig.model_validate({**cfg.model_dump(mode="json"), **patch})
    except ValidationError as exc:
        raise ConfigError(format_validation_error("--set (inference)", exc)) from None


def apply_inference_overrides(cfg: InferenceConfig, overrides: Sequence[str]) -> InferenceConfig:
    """``inference.key=value`` overrides (:func:`inference_patch`) on top of ``cfg``."""
    return patch_inference(cfg, inference_patch(overrides))


def _checkpoint_contract(path: Path, extra: Any) -> tuple[Config, list[str], str]:
    if not isinstance(extra, dict) or not all(k in extra for k in ("config", "channels", "modality")):
        raise MedsegError(
            f"{path}: checkpoint lacks extra['config'/'channels'/'modality'] (write it with medseg train); "
            "inference needs the preprocessing it was trained with"
        )
    try:
        config = Config.model_validate(extra["config"])
    except ValidationError as exc:
        raise MedsegError(format_validation_error(f"{path} (stored config)", exc)) from None
    channels = [str(c) for c in extra["channels"]]
    modality = str(extra["modality"]).upper()
    if not channels or modality not in ("CT", "MR"):
        raise MedsegError(f"{path}: checkpoint has channels {channels} and modality {modality!r}; need >= 1 channel and CT or MR")
    return config, channels, modality


def load_bundle(
    checkpoints: Sequence[str | Path],
    overrides: Sequence[str] = (),
    device: str | torch.device | None = None,
    settings: Mapping[str, Any] | None = None,
) -> InferenceBundle:
    """Load one or more checkpoints (an ensemble) for inference.

    All checkpoints must share channels, modality, preprocessing and output channels (their
    probabilities are averaged). The inference settings are the first checkpoint's, then
    ``overrides`` (``inference.key=value`` texts, e.g. ``--set``), then ``settings`` (typed
    values by inference key, e.g. ``{"tta": True}``), validated together once. Raises
    ``MedsegError`` naming the file otherwise.
    Process-wide settings take effect here: ``threads`` and ``keep_freed_memory``.
    """
    from medseg.models.checkpoint import load_checkpoint, model_from_loaded

    if not checkpoints:
        raise MedsegError("no checkpoint given (--checkpoint)")
    dev = resolve_device(device)
    paths = [Path(p) for p in checkpoints]
    models: list[nn.Module] = []
    first: tuple[Config, list[str], str] | None = None
    for path in paths:
        payload = load_checkpoint(path)  # read once: its contract (extra) and its model
        config, channels, modality = _checkpoint_contract(path, payload.get("extra"))
        model, model_cfg = model_from_loaded(payload, path)
        del payload  # the weights now live in the model
        context = config.preprocess.context_slices
        needed = len(channels) * (2 * context + 1)
        if model_cfg.in_channels != needed:
            raise MedsegError(
                f"{path}: model has {model_cfg.in_channels} input channels but {len(channels)} channel(s) x "
                f"{2 * context + 1} context slices = {needed}"
            )
        if first is None:
            first = (config, channels, modality)
            out_channels = model_cfg.out_channels
        else:
            ref_cfg, ref_channels, ref_modality = first
            if (channels, modality) != (ref_channels, ref_modality) or config.preprocess != ref_cfg.preprocess:
                raise MedsegError(
                    f"{path}: channels/modality/preprocessing differ from {paths[0]}; an ensemble needs identical inputs"
                )
            if model_cfg.out_channels != out_channels:
                raise MedsegError(f"{path}: {model_cfg.out_channels} output channels, {paths[0]} has {out_channels}")
        models.append(model)
    assert first is not None
    config, channels, modality = first
    patch = {**inference_patch(overrides), **(settings or {})}
    config = config.model_copy(update={"inference": patch_inference(config.inference, patch)})
    prepare_models(models, dev, config.inference.channels_last)
    if config.inference.keep_freed_memory:
        keep_freed_memory()
    set_threads(config.inference.threads)
    return InferenceBundle(models, config, channels, modality, paths, dev)


# --------------------------------------------------------------------------- one case


@dataclass
class PreparedCase:
    """A case read and preprocessed: ``data[IMAGE_KEY]`` (C, R, A, S) MetaTensor, source grid."""

    case: InferenceCase
    data: dict[str, Any]
    geometry: Geometry
    seconds: float


@dataclass
class CaseResult:
    """Outputs of one case on the source grid (I, J, K)."""

    mask: np.ndarray
    lesion_prob: np.ndarray
    lesions: np.ndarray | None
    table: pd.DataFrame | None
    timings: dict[str, float] = field(default_factory=dict)


class CasePredictor:
    """Runs cases through one bundle; reusable across cases (the chain is built once)."""

    def __init__(self, bundle: InferenceBundle) -> None:
        self.bundle = bundle
        cfg = bundle.config
        self.chain: Compose = preprocess_transforms(cfg.preprocess, bundle.modality, bundle.channels, with_label=False)
        self.ras_axis = AXIS_INDEX[cfg.preprocess.slice_axis]

    def prepare(self, case: InferenceCase) -> PreparedCase:
        """Read and preprocess ``case`` (raises ``MedsegError`` naming the file)."""
        if case.problem is not None:
            raise MedsegError(f"case {case.case_id}: {case.problem}")
        start = time.perf_counter()
        data = apply_chain(self.chain, {channel_key(c): str(case.images[c]) for c in self.bundle.channels})
        image = data[IMAGE_KEY]
        size = [int(s) for s in np.asarray(image.meta["spatial_shape"])]
        geometry = Geometry.from_affine(np.asarray(image.meta["original_affine"], dtype=np.float64), size)
        return PreparedCase(case, {IMAGE_KEY: image}, geometry, time.perf_counter() - start)

    def to_source(self, prob: torch.Tensor, prepared: PreparedCase) -> np.ndarray:
        """(K, R, A, S) probabilities on the preprocessed grid -> float32 (K, I, J, K) source grid."""
        image = prepared.data[IMAGE_KEY]
        pred = MetaTensor(prob, meta=copy.copy(image.meta), applied_operations=copy.deepcopy(image.applied_operations))
        inverted = Invertd("pred", self.chain, orig_keys=IMAGE_KEY, nearest_interp=False)({IMAGE_KEY: image, "pred": pred})
        out = inverted["pred"]
        array = out.as_tensor().numpy() if isinstance(out, MetaTensor) else np.asarray(out)
        return array.astype(np.float32, copy=False)

    def probabilities(self, prepared: PreparedCase) -> tuple[torch.Tensor, float]:
        """The network's part: (R, A, S) or (K, R, A, S) probabilities on the preprocessed grid
        (:func:`predict_volume`), and the seconds it took.

        Raises ``MedsegError`` when a probability is NaN/Inf (NaN weights, an overflow in reduced
        precision): the image was checked for NaN on reading, so the model is to blame, and a NaN
        map would otherwise be written as an empty mask."""
        start = time.perf_counter()
        prob = predict_volume(
            self.bundle.models, prepared.data[IMAGE_KEY], self.bundle.config.preprocess.context_slices,
            self.bundle.inference, self.bundle.device, axis=self.ras_axis + 1,
        )
        if not bool(torch.isfinite(prob).all()):
            names = ", ".join(str(p) for p in self.bundle.checkpoints) or "the in-memory model"
            raise MedsegError(
                f"case {prepared.case.case_id}: non-finite probabilities from the model: check the checkpoint "
                f"({names}) for NaN/Inf weights, or set inference.precision=fp32"
            )
        return prob, time.perf_counter() - start

    def finish(
        self, prepared: PreparedCase, prob: torch.Tensor, predict_seconds: float = 0.0, writer: CaseWriter | None = None
    ) -> CaseResult:
        """The CPU part after the network: map ``prob`` to the source grid, post-process, label
        lesions. With ``writer``, each output is handed to it the moment it exists, so the mask
        is written while the lesions are labelled and measured (the table is written last)."""
        cfg = self.bundle.inference
        timings = {"read_preprocess": prepared.seconds, "predict": predict_seconds}
        start = time.perf_counter()
        prob_src = self.to_source(prob[None] if prob.ndim == 3 else prob, prepared)
        del prob
        spacing = prepared.geometry.spacing
        mask = postprocess(prob_src[0] if prob_src.shape[0] == 1 else prob_src, spacing, cfg)
        lesion_prob = prob_src[0] if prob_src.shape[0] == 1 else 1.0 - prob_src[0]
        if writer is not None:
            writer.mask(mask)
            if cfg.write_prob:
                writer.probability(lesion_prob)
        lesions = table = None
        if cfg.write_lesions:
            lesions, n = label_components(mask, cfg.connectivity)
            if writer is not None:
                writer.lesions(lesions, n)
            affine = prepared.geometry.affine
            table = lesion_table(
                lesions, n, lesion_prob, affine, spacing, index_axis(affine, self.ras_axis),
                classes=mask if prob_src.shape[0] > 1 else None,
            )
            if writer is not None:
                writer.table(table)
        timings["postprocess"] = time.perf_counter() - start
        return CaseResult(mask, lesion_prob, lesions, table, timings)

    def finish_and_write(
        self, prepared: PreparedCase, prob: torch.Tensor, predict_seconds: float, out_dir: Path, fingerprint: str
    ) -> list[Path]:
        """:meth:`finish` with every output written on the source grid (:class:`.outputs.CaseWriter`),
        each file while the next output is computed (a BraTS case: 88 -> 74 ms against finishing
        first and writing after), the marker last. Returns the written paths."""
        with CaseWriter(out_dir, prepared.case.case_id, prepared.geometry, fingerprint) as writer:
            result = self.finish(prepared, prob, predict_seconds, writer)
            info = {"medseg_version": __version__, "n_lesions": None if result.table is None else len(result.table),
                    "timings_s": {k: round(v, 4) for k, v in result.timings.items()}}
            return writer.close(info)

    def run_case(self, case: InferenceCase, out_dir: str | Path) -> list[Path]:
        """One case end to end (no prefetch): read, preprocess, predict, post-process, write."""
        out = Path(out_dir)
        discard_case(out, case.case_id)
        prepared = self.prepare(case)
        prob, seconds = self.probabilities(prepared)
        return self.finish_and_write(prepared, prob, seconds, out, self.bundle.fingerprint())


# --------------------------------------------------------------------------- batches


@dataclass
class RunSummary:
    """Case ids this rank completed, skipped (already complete) and failed (case_id, error)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, MedsegError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _rank_failures_path(out_dir: Path, rank: int) -> Path:
    return out_dir / f".failures.rank{rank}.csv"


def merge_failures(out_dir: Path, world: int, failures_file: str = FAILURES_FILE) -> pd.DataFrame:
    """Rank 0: concatenate every rank's failure file into ``failures_file`` (then remove them)."""
    frames = []
    for rank in range(world):
        part = _rank_failures_path(out_dir, rank)
        if part.is_file():
            frames.append(pd.read_csv(part, dtype=str, keep_default_na=False))
    merged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["case_id", "error"])
    merged = merged.sort_values("case_id", kind="stable").reset_index(drop=True)
    write_csv(out_dir / failures_file, merged)
    for rank in range(world):
        _rank_failures_path(out_dir, rank).unlink(missing_ok=True)
    return merged


class BatchRun:
    """One batch of cases into ``out_dir`` (see :func:`run_inference`, which is its entry point).

    Per rank: :meth:`run` skips the cases already complete, predicts the others (with
    ``inference.prefetch``: the next case is read in one thread and the previous one finished and
    written in another while the network runs on the current one), records each failing case
    (:meth:`record_failure`) and carries on, then writes ``failures_file`` (merged by rank 0
    under torchrun) and rank 0's ``inference.json``.
    """

    def __init__(
        self,
        bundle: InferenceBundle,
        out_dir: str | Path,
        show_progress: bool = True,
        rank_sharding: bool = True,
        failures_file: str = FAILURES_FILE,
    ) -> None:
        self.bundle = bundle
        self.out = Path(out_dir)
        self.show_progress = show_progress
        self.rank_sharding = rank_sharding
        self.failures_file = failures_file
        self.rank, self.world = torchrun_rank() if rank_sharding else (0, 1)
        self.fingerprint = bundle.fingerprint()
        self.predictor = CasePredictor(bundle)
        self.summary = RunSummary()
        cfg = bundle.inference
        self.overlap = cfg.prefetch if cfg.prefetch != "auto" else bundle.device.type == "cuda"
        # the previous case, post-processed and written in the background: (case_id, its future)
        self.finishing: tuple[str, Future[None]] | None = None
        self.bar: Any = None

    def todo(self, cases: Sequence[InferenceCase]) -> list[InferenceCase]:
        """This rank's share of ``cases`` less those complete in the output folder (recorded as skipped)."""
        cfg = self.bundle.inference
        todo: list[InferenceCase] = []
        for case in shard(cases, self.rank, self.world):
            expected = expected_outputs(case.case_id, cfg.write_prob, cfg.write_lesions)
            if case.problem is None and is_complete(self.out, case.case_id, expected, self.fingerprint):
                self.summary.skipped.append(case.case_id)
            else:
                todo.append(case)
        if self.summary.skipped:
            log.info("rank %d: %d case(s) already complete, skipped", self.rank, len(self.summary.skipped))
        return todo

    def prepare(self, case: InferenceCase) -> PreparedCase:
        """Read and preprocess ``case`` after removing its outputs of earlier settings (e.g. a
        ``_prob`` no longer asked for). Raises ``MedsegError`` for a case with a known problem."""
        if case.problem is not None:
            raise MedsegError(f"case {case.case_id}: {case.problem}")
        discard_case(self.out, case.case_id)
        return self.predictor.prepare(case)

    def record_failure(self, case_id: str, exc: BaseException) -> None:
        """Record ``case_id`` as failed with ``exc``'s text and remove whatever it left."""
        self.summary.failures.append((case_id, _error_text(exc)))
        log.warning("case %s failed: %s", case_id, self.summary.failures[-1][1])
        if check_case_id(case_id) is None:  # never touch files an unusable id could name
            discard_case(self.out, case_id)

    def finish_and_write(self, prepared: PreparedCase, prob: torch.Tensor, seconds: float) -> None:
        self.predictor.finish_and_write(prepared, prob, seconds, self.out, self.fingerprint)

    def settle(self) -> None:
        """Wait for the previous case's outputs and record its result (keeps one case pending)."""
        if self.finishing is None:
            return
        case_id, future = self.finishing
        self.finishing = None
        try:
            future.result()
            self.summary.done.append(case_id)
        except Exception as exc:  # noqa: BLE001
            self.record_failure(case_id, exc)
        self.bar.update(1)

    def predict_all(self, todo: Sequence[InferenceCase]) -> None:
        """Predict ``todo`` one after the other; with ``overlap``, one thread reads the next case and
        another post-processes and writes the previous one while this thread runs the network on
        the current one (without it, the finishing thread is waited for at once)."""
        overlap = self.overlap
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-prefetch") as reader, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="medseg-finish") as finisher:
            upcoming: Future[PreparedCase] | None = reader.submit(self.prepare, todo[0]) if todo and overlap else None
            for i, case in enumerate(todo):
                current: PreparedCase | None = None
                prob: torch.Tensor | None = None
                try:
                    current = upcoming.result() if upcoming is not None else self.prepare(case)
                except Exception as exc:  # noqa: BLE001 - one bad case must not stop the batch
                    error: BaseException = exc
                upcoming = reader.submit(self.prepare, todo[i + 1]) if overlap and i + 1 < len(todo) else None
                if current is not None:
                    try:
                        prob, seconds = self.predictor.probabilities(current)
                    except Exception as exc:  # noqa: BLE001
                        error = exc
                self.settle()
                if current is None or prob is None:
                    self.record_failure(case.case_id, error)
                    self.bar.update(1)
                else:
                    self.finishing = (case.case_id, finisher.submit(self.finish_and_write, current, prob, seconds))
                    if not overlap:
                        self.settle()  # one case at a time: its outputs before the next case is read
                del current, prob
            self.settle()

    def write_records(self) -> None:
        """``failures_file`` (this rank's, merged by rank 0 after a barrier under torchrun) and,
        on rank 0, ``inference.json``."""
        out, rank, world, summary = self.out, self.rank, self.world, self.summary
        frame = pd.DataFrame(summary.failures, columns=["case_id", "error"])
        if world > 1:
            write_csv(_rank_failures_path(out, rank), frame)
            barrier(world)
            if rank == 0:
                merge_failures(out, world, self.failures_file)
        else:
            write_csv(out / self.failures_file, frame)
        if rank == 0:
            bundle = self.bundle
            write_json(out / RUN_RECORD, {
                "medseg_version": __version__,
                "checkpoints": [str(p) for p in bundle.checkpoints],
                "channels": bundle.channels,
                "modality": bundle.modality,
                "device": str(bundle.device),
                "world_size": world,
                "inference": bundle.inference.model_dump(mode="json"),
                "rank0": {"done": len(summary.done), "skipped": len(summary.skipped),
                          "failed": len(summary.failures), "seconds": round(summary.seconds, 3)},
            })

    def run(self, cases: Sequence[InferenceCase]) -> RunSummary:
        """The whole batch (class docstring); returns this rank's summary."""
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        # early: a broken torchrun setup fails before any work
        created_group = join_process_group(self.world) if self.rank_sharding else False
        start = time.perf_counter()
        todo = self.todo(cases)
        rank, world = self.rank, self.world
        self.bar = tqdm(total=len(todo), desc="infer" if world == 1 else f"infer rank {rank}", unit="case",
                        disable=not self.show_progress, position=rank if world > 1 else None)
        self.predict_all(todo)
        self.bar.close()
        self.summary.seconds = time.perf_counter() - start
        self.write_records()
        leave_process_group(created_group)
        return self.summary


def run_inference(
    cases: Sequence[InferenceCase],
    bundle: InferenceBundle,
    out_dir: str | Path,
    show_progress: bool = True,
    rank_sharding: bool = True,
    failures_file: str = FAILURES_FILE,
) -> RunSummary:
    """Predict every case not already complete in ``out_dir`` (this rank's share under torchrun).

    Writes each case's outputs (:mod:`.outputs`), ``failures_file`` (case_id, error; header
    only when nothing failed; merged by rank 0) and ``inference.json`` (settings, checkpoints,
    counts; rank 0). ``rank_sharding=False``: this process predicts every case given, whatever
    torchrun's environment says (the caller shares the work out, e.g. one CV fold per rank).
    Returns this rank's summary (:class:`BatchRun`).
    """
    return BatchRun(bundle, out_dir, show_progress, rank_sharding, failures_file).run(cases)
