"""The inference bundle: checkpoints -> models (one read each) + the config stored with them,
with inference settings patched on top (typed dicts or ``inference.key=value`` texts)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from medseg.config import Config, InferenceConfig, format_validation_error, parse_override, set_dotted
from medseg.errors import ConfigError, MedsegError
from medseg.inference.predictor import network_stride, prepare_models
from medseg.outputs import DISTILL_RECORD
from medseg.runtime import (
    keep_freed_memory,
    resolve_device,
    set_threads,
)

log = logging.getLogger(__name__)

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
    model_dir: Path | None = None  # the model folder the checkpoints came from, if any
    _identity: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def inference(self) -> InferenceConfig:
        return self.config.inference

    def checkpoint_sha256(self) -> list[str]:
        """sha256 of each checkpoint file (recorded in DICOM SEG algorithm identification): the
        ones :attr:`identity` took, so each file is hashed once per bundle."""
        return [entry["sha256"] for entry in self.identity["checkpoints"]]

    @property
    def identity(self) -> dict[str, Any]:
        """The model that runs, for run records (:func:`medseg.auto.model_folder.model_identity`)."""
        if self._identity is None:
            from medseg.auto.model_folder import model_identity

            self._identity = model_identity(self.checkpoints, self.model_dir)
        return self._identity

    def fingerprint(self) -> str:
        """Hash of the checkpoints (path, size, mtime) and the output-relevant settings."""
        settings = self.inference.model_dump(mode="json", exclude=set(NEUTRAL_SETTINGS))
        files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.checkpoints]
        text = json.dumps({"checkpoints": files, "inference": settings}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def inference_patch(overrides: Sequence[str]) -> dict[str, Any]:
    """``inference.key=value`` texts (``--set``) -> ``{key: value}``, values read as YAML, nested
    keys (``inference.dicom_seg.segment_label``) as sections (:func:`medseg.config.set_dotted`);
    other sections are refused (:class:`ConfigError`).

    Preprocessing and model settings come from the checkpoint and cannot be changed at
    inference (the model was trained with them).
    """
    tree: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        if section != "inference" or not name or "" in name.split("."):
            raise ConfigError(
                f"--set {text!r}: only inference.<key> can be set at inference time "
                "(preprocessing and model settings are the checkpoint's)"
            )
        set_dotted(tree, key, value)
    return tree.get("inference", {})


def merge_settings(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """The settings ``layers``, each on top of the ones before; nested sections (``dicom_seg``)
    are merged key by key. The one way inference settings are layered: a model folder's rule,
    under the user's ``--set`` (:func:`inference_patch`), under a command's or stage's options."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge_settings(out[key], value)
            else:
                out[key] = value
    return out


def patch_inference(cfg: InferenceConfig, patch: Mapping[str, Any]) -> InferenceConfig:
    """``cfg`` with the typed values of ``patch`` (inference keys), validated once as a whole
    (an unknown key or a bad value raises :class:`ConfigError`)."""
    try:
        return InferenceConfig.model_validate(merge_settings(cfg.model_dump(mode="json"), patch))
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
    model_dir: str | Path | None = None,
) -> InferenceBundle:
    """Load one or more checkpoints (an ensemble) for inference.

    All checkpoints must share channels, modality, preprocessing and output channels (their
    probabilities are averaged). The inference settings are the first checkpoint's, then
    ``overrides`` (``inference.key=value`` texts, e.g. ``--set``), then ``settings`` (typed
    values by inference key, e.g. ``{"tta": True}``), validated together once. Raises
    ``MedsegError`` naming the file otherwise. ``model_dir``: the model folder they came from
    (named in the run's record). Process-wide settings take effect here: ``threads`` and ``keep_freed_memory``.

    ``inference.backend`` other than torch: the models are the folder's compiled ones
    (:func:`compiled_models`), used only when ``medseg accelerate`` accepted that backend and
    precision for exactly these checkpoints; the backend and precision are part of
    :attr:`InferenceBundle.inference`, so they reach the run's record and the case fingerprint.
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
    patch = merge_settings(inference_patch(overrides), settings or {})
    config = config.model_copy(update={"inference": patch_inference(config.inference, patch)})
    stride = network_stride(models)
    if min(config.inference.roi_size) < stride:
        raise ConfigError(
            f"inference.roi_size {list(config.inference.roi_size)} is smaller than the network's stride {stride} "
            f"({config.model.arch}): give at least [{stride}, {stride}] (default [512, 512])"
        )
    prepare_models(models, dev, config.inference.channels_last)
    if config.inference.keep_freed_memory:
        keep_freed_memory()
    set_threads(config.inference.threads)
    folder = Path(model_dir) if model_dir else None
    identity = None  # the bundle's identity, taken once: its checkpoint hashes also check a compiled variant
    if folder is not None and dev.type == "cpu" and config.inference.backend != "torch":
        from medseg.auto.model_folder import model_identity

        identity = model_identity(paths, folder)
    sha256 = None if identity is None else [entry["sha256"] for entry in identity["checkpoints"]]
    if config.inference.backend == "auto":
        chosen = _auto_backend(paths, config.inference, dev, folder, sha256)
        config = config.model_copy(update={"inference": config.inference.model_copy(update=chosen)})
    if config.inference.backend != "torch":
        from medseg.inference.backends import resolve_precision

        models = compiled_models(paths, models, config.inference, dev, folder, sha256)
        precision = resolve_precision(config.inference.backend, config.inference.precision)  # auto -> fp32, recorded
        # the runtimes take NCHW arrays: stacks built channels-last would be transposed once more per batch
        compiled_settings = {"precision": precision, "channels_last": False}
        config = config.model_copy(update={"inference": config.inference.model_copy(update=compiled_settings)})
    return InferenceBundle(models, config, channels, modality, paths, dev, folder, _identity=identity)


def load_model_folder(
    model_dir: str | Path, settings: Mapping[str, Any] | None = None, device: str | torch.device | None = None
) -> InferenceBundle:
    """A model folder as one bundle: its fold models averaged, or its distilled student.

    The post-processing chosen on cross-validation comes first, then ``settings`` (the user's
    ``--set inference.*`` and command options, typed by key). With ``inference.student`` ``auto``
    (the default) a student that ``medseg distill`` accepted stands in for the folds
    (:func:`medseg.auto.model_folder.read_student`: its checkpoint and the folds it learned from
    must be the ones recorded, else ``MedsegError``); ``false`` always loads the folds, ``true``
    requires the student.
    """
    from medseg.auto.model_folder import read_model_folder, read_student

    folder = read_model_folder(model_dir)
    merged = merge_settings(folder.postprocess, settings or {})
    student_mode = merged.get("student", "auto")
    if student_mode not in ("auto", True, False):
        raise ConfigError(f"inference.student must be auto, true or false (off), got {student_mode!r}")
    student = read_student(folder) if student_mode is not False else None
    if student is None and student_mode is True:
        raise MedsegError(f"{model_dir}: inference.student=true but the folder has no student that medseg distill "
                          f"accepted (see its {DISTILL_RECORD}); run medseg distill or use inference.student=auto")  # fmt: skip
    if student is not None:
        check = student.record.get("check", {})
        log.info("model folder %s: its distilled student stands in for the %d fold model(s) (out-of-fold Dice %s "
                 "against the folds' %s; inference.student=false runs the folds); post-processing %s", model_dir,
                 len(folder.checkpoints), check.get("students_mean_dice"), check.get("ensemble_mean_dice"),
                 folder.postprocess or "of the checkpoints")  # fmt: skip
        return load_bundle([student.checkpoint], device=device, settings=merged, model_dir=model_dir)
    log.info("model folder %s: %d fold model(s) averaged; post-processing %s", model_dir, len(folder.checkpoints),
             folder.postprocess or "of the checkpoints")
    return load_bundle(folder.checkpoints, device=device, settings=merged, model_dir=model_dir)


def _auto_backend(
    checkpoints: Sequence[Path], cfg: InferenceConfig, device: torch.device, model_dir: Path | None,
    sha256: Sequence[str] | None = None,
) -> dict[str, str]:
    """``inference.backend: auto`` resolved: the fastest variant ``medseg accelerate`` accepted for
    this model folder's checkpoints (:func:`medseg.inference.backends.fastest_accepted`), else
    torch. Plain checkpoints and GPUs run torch; int8 without an accepted int8 variant is refused."""
    chosen = None
    if model_dir is not None and device.type == "cpu":
        from medseg.inference.backends import fastest_accepted

        chosen = fastest_accepted(model_dir, checkpoints, cfg.precision, sha256)
    if chosen is not None:
        log.info("inference.backend auto: %s %s (accepted by medseg accelerate, fastest on the CV cases)", *chosen)
        return {"backend": chosen[0], "precision": chosen[1]}
    if cfg.precision == "int8":
        raise ConfigError("inference.precision int8: no int8 variant accepted for these checkpoints "
                          "(medseg accelerate MODEL_DIR --backend onnxruntime|openvino --precision int8)")  # fmt: skip
    return {"backend": "torch"}


def compiled_models(
    checkpoints: Sequence[Path], models: Sequence[nn.Module], cfg: InferenceConfig, device: torch.device,
    model_dir: Path | None, sha256: Sequence[str] | None = None,
) -> list[nn.Module]:
    """The compiled counterparts of ``models`` for ``cfg.backend`` / ``cfg.precision``
    (:mod:`medseg.inference.backends`), from the model folder ``model_dir`` (``sha256``: the
    checkpoints' hashes, if taken already).

    Refused (``MedsegError``): plain checkpoints (no model folder: no cross-validation patients
    whose masks could have been checked against the torch ensemble), a GPU device (the compiled
    backends run on the CPU), and a variant that ``medseg accelerate`` has not accepted for
    these exact checkpoints (the message names the measured Dice, or the command to run)."""
    from medseg.inference.backends import load_accepted_models, resolve_precision

    if model_dir is None:
        names = ", ".join(str(p) for p in checkpoints)
        raise MedsegError(
            f"inference.backend={cfg.backend}: {names} is not a model folder; a compiled backend is used only after "
            "medseg accelerate has checked its masks against the torch ensemble on the folder's cross-validation "
            "patients: run with --model DIR (pipelines/auto.yaml's model/) or inference.backend=torch"
        )
    if device.type != "cpu":
        raise ConfigError(f"inference.backend={cfg.backend} runs on the CPU; use --device cpu or inference.backend=torch")
    precision = resolve_precision(cfg.backend, cfg.precision)
    return list(load_accepted_models(model_dir, checkpoints, models, cfg.backend, precision, cfg.threads, sha256))

