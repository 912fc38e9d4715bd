"""Model checkpoints: plain tensors and primitives only, written atomically, read with ``weights_only``.

File content (a ``dict``)::

    format          "medseg-checkpoint"
    format_version  1
    medseg_version  the writing package's version
    model           ModelConfig as a plain dict
    state_dict      the model's tensors
    extra           the caller's plain data (epoch, metrics, optimiser state, ...)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from medseg import __version__
from medseg.atomic import atomic_path, failed_write_reason
from medseg.config import ModelConfig, format_validation_error
from medseg.errors import MedsegError

FORMAT = "medseg-checkpoint"
FORMAT_VERSION = 1
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.Size)


def _check_plain(value: Any, where: str) -> None:
    """Raise ``TypeError`` unless ``value`` is nested dicts/lists/tuples of tensors and primitives."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(
            f"{where}: {type(value).__name__} cannot go into a checkpoint (tensors and primitives only)"
        )


def save_checkpoint(
    path: str | Path, model: nn.Module, model_cfg: ModelConfig, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights, its config and ``extra`` to ``path`` atomically (temp file + rename).

    ``extra`` must hold only tensors and primitives (``TypeError`` otherwise), so that
    ``torch.load(weights_only=True)`` can read it back. Returns the path written.
    """
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "medseg_version": __version__,
        "model": model_cfg.model_dump(mode="json"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    _check_plain(payload["extra"], "extra")
    return _write_payload(payload, path)


def _write_payload(payload: dict[str, Any], path: Path) -> Path:
    """``torch.save`` through :func:`medseg.atomic.atomic_path` with fsync (never a half-written file)."""
    try:
        with atomic_path(path, fsync=True) as tmp:
            torch.save(payload, tmp)
    except RuntimeError as exc:  # torch's zip writer reports a failed write (a full disk) as RuntimeError
        from medseg.errors import OutputError

        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise OutputError(path, f"cannot write the checkpoint: {failed_write_reason(path.parent, first, path)}") from None
    return path


def unreadable_checkpoint_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line and without torch's
    advice to turn safe loading off (a checkpoint from elsewhere may run code when unpickled)."""
    import pickle

    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text or "Unsupported global" in text:
        return ("not a medseg checkpoint: it holds Python objects other than tensors and plain values, which "
                "medseg never unpickles (safe loading); export it again with medseg train / medseg export")
    if "zip archive" in text or "central directory" in text or isinstance(exc, EOFError):
        return "not a readable checkpoint (truncated, or not a PyTorch file)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"not a readable checkpoint ({type(exc).__name__}: {first[:160]})"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (on the CPU, ``weights_only=True``).

    Raises ``MedsegError`` naming the file when it is missing, unreadable or not a medseg checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, disallowed pickle content, ...
        import zipfile

        if not zipfile.is_zipfile(path):  # medseg (torch.save) always writes a zip archive
            raise MedsegError(f"{path}: not a checkpoint (not a PyTorch file, or truncated)") from None
        raise MedsegError(f"{path}: {unreadable_checkpoint_reason(exc)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise MedsegError(f"{path}: not a medseg checkpoint (no 'format: {FORMAT}' entry)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise MedsegError(
            f"{path}: checkpoint format version {payload.get('format_version')!r} is not supported "
            f"(this medseg reads version {FORMAT_VERSION})"
        )
    for key in ("model", "state_dict"):
        if not isinstance(payload.get(key), dict):
            raise MedsegError(f"{path}: checkpoint has no {key!r} dict")
    return payload


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, ModelConfig]:
    """Rebuild the model a checkpoint was saved from and load its weights.

    Returns ``(model, model_cfg)``; the model is in eval mode. The encoder's ``pretrained``
    file is not read again (the checkpoint's weights replace it), and is cleared in the returned config.
    """
    return model_from_loaded(load_checkpoint(path), path)


def model_from_loaded(payload: dict[str, Any], path: str | Path) -> tuple[nn.Module, ModelConfig]:
    """:func:`model_from_checkpoint` for a checkpoint already read with :func:`load_checkpoint`
    (``path`` only names the file in errors), so a caller that also needs ``extra`` reads the file once."""
    from medseg.models.registry import build_model

    try:
        stored = {k: v for k, v in payload["model"].items() if k not in ("pretrained", "pretrained_path")}
        cfg = ModelConfig.model_validate(stored)
    except ValidationError as exc:
        raise MedsegError(format_validation_error(f"{path} (model config)", exc)) from None
    model = build_model(cfg)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise MedsegError(f"{path}: weights do not match the model in its config: {exc}") from exc
    model.eval()
    return model, cfg


# training state in ``extra`` that inference never reads (the optimiser alone is ~2x the weights)
TRAINING_STATE_KEYS = ("optimizer", "scheduler", "scaler", "sampler", "rng", "train_weights", "bad_validations")


def write_inference_checkpoint(source: str | Path, out: str | Path) -> Path:
    """Copy of checkpoint ``source`` without its training state (``TRAINING_STATE_KEYS``).

    The weights, model config and what inference needs (training config, channels, modality,
    epoch, metrics) stay, so ``medseg infer`` reads it like the original; ``--resume`` cannot.
    For sharing a trained model (about a third of the size of ``best.pt``). Written atomically.
    """
    payload = load_checkpoint(source)
    extra = {k: v for k, v in payload.get("extra", {}).items() if k not in TRAINING_STATE_KEYS}
    return _write_payload({**payload, "extra": {**extra, "inference_only": True}}, Path(out))
