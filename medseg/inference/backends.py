"""Compiled runtimes for the fold models: ONNX Runtime and OpenVINO behind the torch network's
interface, so :func:`medseg.inference.predictor.predict_volume` runs them unchanged.

Contract of a :class:`BackendModel` (what ``predict_volume`` receives as ``models``): an
``nn.Module`` in eval mode without parameters, holding the runtime's compiled model, with the
torch network's ``multiple`` (its deepest pooling stride, for the window placement); its forward
takes an (N, Cin, H, W) float32 tensor (Cin = channels x (2 x context + 1) slices, neighbour
major; any N, H, W: the export has dynamic batch, height and width axes, so one compiled model
serves every slice size and a cascade's boxes) and returns (N, K, H, W) float32 logits on the CPU.
Threads: ``inference.threads``, else torch's thread count.

What runs, per ``inference.backend`` / ``inference.precision`` (``auto`` = fp32), and its files
in ``MODEL_DIR/<BACKENDS_DIR>/<backend>-<precision>/`` (one per fold checkpoint, named after it):

==============  =========  ==============================================================  ==============
backend         precision  compiled model                                                  file
==============  =========  ==============================================================  ==============
onnxruntime     fp32       the ONNX export (:func:`medseg.models.export.export_onnx`)      ``<stem>.onnx``
onnxruntime     int8       static QDQ quantization: weights int8 per output channel,       ``<stem>.onnx``
                           activations uint8, ranges min/max over calibration stacks
openvino        fp32       the ONNX export compiled with ``INFERENCE_PRECISION_HINT`` f32  ``<stem>.onnx``
openvino        bf16       the same with bf16 (CPUs with AVX-512 BF16 or AMX only)         ``<stem>.onnx``
openvino        int8       ``nncf.quantize`` (mixed preset, min/max activation ranges)     ``<stem>.xml`` + ``.bin``
==============  =========  ==============================================================  ==============

Both int8 paths keep the operation that produces the logits in float (NNCF's default range
estimate, a mean over samples of each sample's maximum, clipped the logits of a BraTS model
whose slices are mostly lesion-free: Dice 0.88 against fp32; min/max ranges and a float last
operation fixed it). Compilation and calibration (:mod:`.compilation`:
:func:`~medseg.inference.compilation.calibration_stacks`): 2.5D stacks of training cases
through medseg's own preprocessing chain, half from slices with lesion and half without, padded
to the network's pooling grid as the predictor pads them.

A compiled model is used by ``medseg infer`` only after ``medseg accelerate``
(:mod:`medseg.inference.acceleration`) has compared its masks with the fp32 torch ensemble on the
cross-validation patients and recorded it as accepted in ``MODEL_DIR/<BACKENDS_RECORD>`` for
exactly these checkpoints (:func:`accepted_entry`).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.atomic import sha256_file
from medseg.errors import MedsegError
from medseg.outputs import BACKENDS_DIR, BACKENDS_RECORD
from medseg.text_input import read_user_json

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "openvino")
PRECISIONS_BY_BACKEND: dict[str, tuple[str, ...]] = {"onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}
PACKAGES: dict[str, tuple[str, ...]] = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino", "nncf")}
ACCEPT_DICE = 0.995  # every cross-validation case's mask must match the fp32 torch ensemble's at least this well
RECORD_FORMAT = "medseg-backends"
RECORD_VERSION = 1
ONNX_SUFFIX = ".onnx"
IR_SUFFIXES = (".xml", ".bin")  # an OpenVINO model: graph + weights


# --------------------------------------------------------------------------- names, availability


def resolve_precision(backend: str, precision: str) -> str:
    """The compiled precision of ``backend`` for the ``inference.precision`` setting (``auto`` =
    fp32). Raises ``MedsegError`` for a backend medseg does not compile to, a precision the backend
    has no path for, or bf16 on a CPU without AVX-512 BF16 / AMX."""
    if backend not in BACKENDS:
        raise MedsegError(f"inference.backend {backend!r}: compiled backends are {', '.join(BACKENDS)}")
    name = "fp32" if precision == "auto" else precision
    if name not in PRECISIONS_BY_BACKEND[backend]:
        raise MedsegError(f"inference.precision {precision!r}: backend {backend} runs "
                          f"{', '.join(PRECISIONS_BY_BACKEND[backend])} (auto = fp32)")  # fmt: skip
    if name == "bf16":
        from medseg.runtime import cpu_has_fast_bf16

        if not cpu_has_fast_bf16():
            raise MedsegError(f"inference.precision bf16 with {backend}: this CPU has no AVX-512 BF16 / AMX "
                              "instructions (bf16 would be emulated, slower than fp32); use fp32 or int8")  # fmt: skip
    return name


def variant_name(backend: str, precision: str) -> str:
    """``<backend>-<precision>``: the key in the record and the folder under :data:`BACKENDS_DIR`."""
    return f"{backend}-{precision}"


def variant_dir(model_dir: str | Path, backend: str, precision: str) -> Path:
    return Path(model_dir) / BACKENDS_DIR / variant_name(backend, precision)


def backend_available(backend: str) -> bool:
    """Whether every package ``backend`` needs can be imported (``pip install 'medseg[fast]'``)."""
    return all(importlib.util.find_spec(name) is not None for name in PACKAGES[backend])


def require_backend(backend: str) -> None:
    """Raise ``MedsegError`` naming the missing packages of ``backend``."""
    missing = [name for name in PACKAGES[backend] if importlib.util.find_spec(name) is None]
    if missing:
        raise MedsegError(f"inference.backend {backend} needs {', '.join(missing)}: pip install 'medseg[fast]'")


def library_versions(backend: str) -> dict[str, str]:
    """Versions of torch and of ``backend``'s packages (recorded beside each check)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for name in PACKAGES[backend]:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def inference_threads(threads: int | None) -> int:
    """``inference.threads``, else torch's intra-op thread count."""
    return int(threads) if threads else torch.get_num_threads()


# --------------------------------------------------------------------------- the runtime modules


class BackendModel(nn.Module, ABC):
    """A compiled model as the torch network (module docstring): ``(N, Cin, H, W)`` float32 ->
    ``(N, K, H, W)`` float32 logits on the CPU. ``multiple``: the torch model's pooling stride;
    ``file``: what it runs."""

    def __init__(self, file: Path, multiple: int) -> None:
        super().__init__()
        self.file = Path(file)
        self.multiple = int(multiple)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"{self.file}: input must be (N, Cin, H, W), got shape {tuple(x.shape)}")
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.run(array))

    @abstractmethod
    def run(self, array: np.ndarray) -> np.ndarray:
        """(N, Cin, H, W) float32 C-contiguous array -> (N, K, H, W) float32 logits (the runtime's call)."""


class OnnxRuntimeModel(BackendModel):
    """An ONNX file (fp32 or QDQ int8) in an ONNX Runtime CPU session with ``threads`` intra-op threads."""

    def __init__(self, file: Path, multiple: int, threads: int) -> None:
        super().__init__(file, multiple)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between runs: a fold ensemble runs several sessions one after another,
        # and each one's spinning threads would take the cores from the next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, array: np.ndarray) -> np.ndarray:
        (out,) = self.session.run(None, {self.input_name: array})
        return np.asarray(out, dtype=np.float32)


class OpenVinoModel(BackendModel):
    """An ONNX file or OpenVINO IR (``.xml`` + ``.bin``) compiled for the CPU with ``hint``
    (``f32`` | ``bf16``) as ``INFERENCE_PRECISION_HINT``, ``threads`` threads, one stream.
    The model keeps the export's dynamic axes: one compiled model serves every shape."""

    def __init__(self, file: Path, multiple: int, threads: int, hint: str) -> None:
        super().__init__(file, multiple)
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(file), str(file.with_suffix(IR_SUFFIXES[1]))) if file.suffix == IR_SUFFIXES[0] \
            else core.read_model(str(file))  # fmt: skip
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                  "INFERENCE_PRECISION_HINT": hint}  # fmt: skip
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def run(self, array: np.ndarray) -> np.ndarray:
        result = self.request.infer({0: array})
        return np.array(result[0], dtype=np.float32, copy=True)  # the request's buffer is reused by the next call


def compiled_file(folder: Path, stem: str, backend: str, precision: str) -> Path:
    """The file a variant runs for the checkpoint named ``stem`` (module docstring's table)."""
    if backend == "openvino" and precision == "int8":
        return folder / f"{stem}{IR_SUFFIXES[0]}"
    return folder / f"{stem}{ONNX_SUFFIX}"


def variant_files(folder: Path, stem: str, backend: str, precision: str) -> list[Path]:
    """Every file of one compiled model (an OpenVINO IR is two)."""
    main = compiled_file(folder, stem, backend, precision)
    return [main, main.with_suffix(IR_SUFFIXES[1])] if main.suffix == IR_SUFFIXES[0] else [main]


def load_backend_model(file: Path, backend: str, precision: str, multiple: int, threads: int | None) -> BackendModel:
    """The runtime module for one compiled file (:class:`OnnxRuntimeModel` / :class:`OpenVinoModel`)."""
    require_backend(backend)
    count = inference_threads(threads)
    if backend == "onnxruntime":
        return OnnxRuntimeModel(file, multiple, count)
    return OpenVinoModel(file, multiple, count, "bf16" if precision == "bf16" else "f32")


# --------------------------------------------------------------------------- the record


def read_backends_record(model_dir: str | Path) -> dict[str, Any]:
    """``MODEL_DIR/<BACKENDS_RECORD>`` (``{"entries": {}}`` when absent). Raises ``MedsegError``
    naming the file when it is not a backends record."""
    path = Path(model_dir) / BACKENDS_RECORD
    if not path.is_file():
        return {"format": RECORD_FORMAT, "format_version": RECORD_VERSION, "entries": {}}
    record = read_user_json(path, MedsegError)
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or not isinstance(record.get("entries"), dict):
        raise MedsegError(f"{path}: not a medseg backends record (format {RECORD_FORMAT!r} expected)")
    return record


def accepted_entry(model_dir: str | Path, checkpoints: Sequence[Path], backend: str, precision: str,
                   sha256: Sequence[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """The record entry of ``backend``/``precision`` when ``medseg accelerate`` accepted it for
    exactly ``checkpoints`` (same files, same sha256, same order; ``sha256``: their hashes when
    the caller has them already) and its compiled files are the ones it checked (sha256). Raises
    ``MedsegError`` otherwise, naming the measured Dice or saying how to check it."""
    folder = Path(model_dir)
    name = variant_name(backend, precision)
    command = f"medseg accelerate {folder} --manifest POOL.csv --backend {backend} --precision {precision}"
    entry = read_backends_record(folder)["entries"].get(name)
    if not isinstance(entry, dict):
        raise MedsegError(f"{folder}: inference.backend={backend} precision={precision} not checked: run {command}")
    hashes = list(sha256) if sha256 is not None else [sha256_file(p) for p in checkpoints]
    have = [{"file": p.name, "sha256": h} for p, h in zip(checkpoints, hashes, strict=True)]
    if [{"file": c.get("file"), "sha256": c.get("sha256")} for c in entry.get("checkpoints", [])] != have:
        raise MedsegError(f"{folder / BACKENDS_RECORD}: {name} was checked for other checkpoints than the model "
                          f"folder's (changed since); run {command} again")  # fmt: skip
    if not entry.get("accepted"):
        raise MedsegError(
            f"{folder / BACKENDS_RECORD}: {name} refused: its masks match the fp32 torch ensemble with Dice "
            f"{entry.get('min_dice')} on case {entry.get('worst_case')} (needs >= {entry.get('threshold', ACCEPT_DICE)} "
            f"on every cross-validation case); use inference.backend=torch or another precision"
        )
    for item in entry.get("files", []):
        file = folder / str(item.get("file"))
        if not file.is_file() or sha256_file(file) != item.get("sha256"):
            raise MedsegError(f"{file}: compiled model missing or changed since {name} was checked; run {command} again")
    return entry


def fastest_accepted(model_dir: str | Path, checkpoints: Sequence[Path], precision: str,
                     sha256: Sequence[str] | None = None) -> tuple[str, str] | None:  # fmt: skip
    """``inference.backend: auto``: the (backend, precision) that ``medseg accelerate`` accepted
    for exactly ``checkpoints`` (``sha256``: their hashes, if known) and that predicted the
    cross-validation cases fastest, among the variants this machine can run (packages installed;
    bf16 only on CPUs with fast bf16) and, when ``precision`` is not ``auto``, of that precision.
    ``None``: no such variant (no record, none accepted, checkpoints changed since): the caller
    runs torch. Candidates are checked fastest first; the first that holds is taken."""
    from medseg.runtime import cpu_has_fast_bf16

    folder = Path(model_dir)
    if not (folder / BACKENDS_RECORD).is_file():
        return None
    candidates: list[tuple[float, str, str]] = []
    for entry in read_backends_record(folder)["entries"].values():
        backend, compiled = str(entry.get("backend")), str(entry.get("precision"))
        if not entry.get("accepted") or backend not in BACKENDS or precision not in ("auto", compiled):
            continue
        if not backend_available(backend) or (compiled == "bf16" and not cpu_has_fast_bf16()):
            continue
        candidates.append((float((entry.get("timings_s") or {}).get("backend_predict", math.inf)), backend, compiled))
    if not candidates:
        return None
    hashes = list(sha256) if sha256 is not None else [sha256_file(p) for p in checkpoints]
    for _, backend, compiled in sorted(candidates):
        try:
            accepted_entry(folder, checkpoints, backend, compiled, hashes)
        except MedsegError:
            continue  # checked for other checkpoints or files changed: not a candidate
        return backend, compiled
    return None


def load_accepted_models(
    model_dir: str | Path, checkpoints: Sequence[Path], models: Sequence[nn.Module], backend: str, precision: str,
    threads: int | None, sha256: Sequence[str] | None = None,
) -> list[BackendModel]:
    """The compiled models of an accepted variant (:func:`accepted_entry`; ``sha256``: the
    checkpoints' hashes, if known), one per checkpoint (in order), each with its torch model's
    ``multiple``."""
    require_backend(backend)
    accepted_entry(model_dir, checkpoints, backend, precision, sha256)
    folder = variant_dir(model_dir, backend, precision)
    return [
        load_backend_model(compiled_file(folder, Path(ckpt).stem, backend, precision), backend, precision,
                           int(getattr(model, "multiple", 1)), threads)
        for ckpt, model in zip(checkpoints, models, strict=True)
    ]  # fmt: skip
