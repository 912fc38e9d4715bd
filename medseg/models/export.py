"""Export a model to TorchScript or ONNX and check it against PyTorch.

- ``torchscript``: ``torch.jit.trace`` at ``(batch, C, height, width)``; the padding/cropping
  arithmetic is traced from the input's shape, so other sizes work too (checked in the tests).
  ``torch.jit`` is deprecated in recent PyTorch releases; prefer ONNX for deployment.
- ``onnx``: the TorchScript-based exporter (``dynamo=False``, opset 17) with dynamic batch,
  height and width axes (input ``image``, output ``logits``).

``verify_export`` runs the exported file on a random input and returns the max absolute
difference to the PyTorch model's output.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg.atomic import atomic_path
from medseg.errors import MedsegError

ONNX_OPSET = 17


def export_torchscript(model: nn.Module, path: str | Path, example: torch.Tensor) -> Path:
    """Trace ``model`` (eval mode) on ``example`` ``(B, C, H, W)`` and save it to ``path``."""
    path = Path(path)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic; torch.jit's deprecation notice
        traced = torch.jit.trace(model, example)
    with atomic_path(path) as tmp:
        traced.save(str(tmp))
    return path


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor) -> Path:
    """Export ``model`` (eval mode) to ONNX with dynamic batch/height/width axes."""
    if importlib.util.find_spec("onnx") is None:
        raise MedsegError("ONNX export needs the 'onnx' package: pip install 'medseg[export]'")
    path = Path(path)
    model.eval()
    axes = {0: "batch", 2: "height", 3: "width"}
    with torch.no_grad(), warnings.catch_warnings(), atomic_path(path) as tmp:
        warnings.simplefilter("ignore")  # tracer and deprecation warnings of the legacy exporter
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=False,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": axes, "logits": axes},
            opset_version=ONNX_OPSET,
        )
    return path


EXPORTERS: dict[str, Callable[[nn.Module, str | Path, torch.Tensor], Path]] = {
    "torchscript": export_torchscript,
    "onnx": export_onnx,
}

SUFFIXES: dict[str, str] = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}


def export_model(model: nn.Module, path: str | Path, fmt: str, example: torch.Tensor) -> Path:
    """Export with the exporter named ``fmt``; unknown formats list the valid ones."""
    if fmt not in EXPORTERS:
        raise MedsegError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORTERS)}")
    return EXPORTERS[fmt](model, path, example)


def load_exported(path: str | Path, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Load an exported file; returns a function ``(B, C, H, W) tensor -> logits tensor``."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")

        def run_script(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module(x)

        return run_script
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            (out,) = session.run(["logits"], {"image": x.numpy()})
            return torch.from_numpy(np.asarray(out))

        return run_onnx
    raise MedsegError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORTERS)}")


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` can be imported (needed to check an ONNX export)."""
    return importlib.util.find_spec("onnxruntime") is not None


def verify_export(
    model: nn.Module, path: str | Path, fmt: str, inputs: torch.Tensor | list[torch.Tensor]
) -> float:
    """Max absolute difference between ``model(x)`` and the exported file's output over ``inputs``."""
    model.eval()
    run = load_exported(path, fmt)
    worst = 0.0
    for x in inputs if isinstance(inputs, list) else [inputs]:
        with torch.no_grad():
            expected = model(x)
        got = run(x)
        if got.shape != expected.shape:
            raise MedsegError(f"{path}: exported output shape {tuple(got.shape)} != {tuple(expected.shape)}")
        worst = max(worst, float((got - expected).abs().max()))
    return worst
