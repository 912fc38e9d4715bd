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
operation fixed it). Calibration (:func:`calibration_stacks`): 2.5D stacks of training cases
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
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.atomic import atomic_path, sha256_file
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


class BackendModel(nn.Module):
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

    def run(self, array: np.ndarray) -> np.ndarray:  # pragma: no cover - the subclasses'
        raise NotImplementedError


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


# --------------------------------------------------------------------------- export and quantization


def example_input(in_channels: int, stride: int) -> torch.Tensor:
    """The tracing input of an export: (1, Cin, S, S), S a multiple of the stride of at least 64
    (the export's height and width stay dynamic)."""
    side = max(64, 2 * stride)
    side = -(-side // stride) * stride
    return torch.zeros(1, in_channels, side, side)


def logits_node_onnx(path: Path) -> str | None:
    """Name of the ONNX node that produces the graph's first output (kept float by int8)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    output = graph.output[0].name
    return next((node.name for node in graph.node if output in node.output), None)


def quantize_onnxruntime(source: Path, target: Path, stacks: Sequence[np.ndarray]) -> Path:
    """Static QDQ int8 of the ONNX file ``source`` into ``target``: weights int8 per output channel,
    activations uint8 with min/max ranges over ``stacks`` ((1, Cin, H, W) float32 each); the node
    producing the logits stays float."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(stacks)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self.items, None)
            return None if item is None else {"image": np.ascontiguousarray(item, dtype=np.float32)}

    keep = logits_node_onnx(source)
    with tempfile.TemporaryDirectory(prefix="medseg-quant-") as scratch:
        prepared = Path(scratch) / f"prepared{ONNX_SUFFIX}"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)  # dynamic pads defeat it
        with atomic_path(target) as tmp:
            quantize_static(
                str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=[keep] if keep else [],
            )  # fmt: skip
    return target


def quantize_openvino(source: Path, target: Path, stacks: Sequence[np.ndarray]) -> list[Path]:
    """``nncf.quantize`` of the ONNX file ``source`` into the OpenVINO IR ``target`` (``.xml``, with
    its ``.bin``): mixed preset (symmetric weights, asymmetric activations), min/max activation
    ranges over ``stacks``, the operation producing the logits kept float. Weights are stored
    as they are (no fp16 compression)."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    model = ov.Core().read_model(str(source))
    last = model.outputs[0].get_node().input_value(0).get_node()
    quantized = nncf.quantize(
        model, nncf.Dataset([np.ascontiguousarray(s, dtype=np.float32) for s in stacks]), subset_size=len(stacks),
        preset=nncf.QuantizationPreset.MIXED,
        ignored_scope=nncf.IgnoredScope(names=[last.get_friendly_name()], validate=False),
        advanced_parameters=AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX),
    )  # fmt: skip
    weights = target.with_suffix(IR_SUFFIXES[1])
    with atomic_path(weights) as tmp_bin, atomic_path(target) as tmp_xml:
        ov.serialize(quantized, str(tmp_xml), str(tmp_bin))
    return [target, weights]


def compile_model(
    model: nn.Module, in_channels: int, folder: Path, stem: str, backend: str, precision: str,
    stacks: Sequence[np.ndarray] = (),
) -> list[Path]:
    """Export the torch ``model`` for ``backend``/``precision`` into ``folder`` (files named after
    the checkpoint ``stem``; module docstring's table); int8 needs calibration ``stacks``.
    Returns the written files."""
    from medseg.models.export import export_onnx

    require_backend(backend)
    if precision == "int8" and not stacks:
        raise MedsegError(f"{variant_name(backend, precision)}: int8 needs calibration stacks (training cases)")
    folder.mkdir(parents=True, exist_ok=True)
    example = example_input(in_channels, int(getattr(model, "multiple", 1)))
    target = compiled_file(folder, stem, backend, precision)
    if precision != "int8":
        return [export_onnx(model, target, example)]
    with tempfile.TemporaryDirectory(prefix="medseg-export-") as scratch:
        fp32 = export_onnx(model, Path(scratch) / f"{stem}{ONNX_SUFFIX}", example)
        if backend == "onnxruntime":
            return [quantize_onnxruntime(fp32, target, stacks)]
        return quantize_openvino(fp32, target, stacks)


# --------------------------------------------------------------------------- calibration


def calibration_stacks(
    cases: Sequence[Any], config: Any, stride: int, per_case: int = 8, seed: int = 0,
) -> dict[str, list[np.ndarray]]:
    """Calibration inputs per case id: ``per_case`` 2.5D stacks of each labelled training
    :class:`medseg.manifest.Case` through the checkpoint's preprocessing (``config``: its
    :class:`medseg.config.Config`; :func:`medseg.data.volumes.preprocess_case`), half from slices
    with lesion and half from slices without (the other kind fills up when one is short), spread
    over the volume. Each is (1, Cin, H', W') float32, the plane edge-padded onto the ``stride``
    grid where the predictor puts it (:func:`medseg.inference.predictor.window_padding`)."""
    from medseg.data.volumes import preprocess_case
    from medseg.inference.predictor import edge_padded_copy, window_padding
    from medseg.transforms.preprocessing import context_stack

    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {}
    context = config.preprocess.context_slices
    for case in cases:
        volume = preprocess_case(case, config.preprocess, config.data.labels)  # image (C, S, H, W), label (S, H, W)
        lesion = (volume.label > 0).flatten(1).any(1).numpy()
        with_lesion, without = np.flatnonzero(lesion), np.flatnonzero(~lesion)
        take_lesion = min(len(with_lesion), max(per_case // 2, per_case - len(without)))
        picks = [*_spread(with_lesion, take_lesion, rng), *_spread(without, per_case - take_lesion, rng)]
        plane = volume.image.shape[2:]
        padding = window_padding(plane, config.inference.roi_size, stride)
        stacks = context_stack(volume.image, sorted(picks), context, axis=1)  # (N, Cin, H, W)
        padded = edge_padded_copy(stacks, [(0, 0), (0, 0), *padding])
        out[case.case_id] = [padded[i : i + 1].numpy().astype(np.float32) for i in range(padded.shape[0])]
    return out


def _spread(indices: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    """``n`` of ``indices`` evenly spread (all of them when there are fewer)."""
    if n <= 0 or len(indices) == 0:
        return []
    if len(indices) <= n:
        return [int(i) for i in indices]
    positions = np.linspace(0, len(indices) - 1, n).round().astype(int)
    return [int(indices[p]) for p in positions]


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


def accepted_entry(model_dir: str | Path, checkpoints: Sequence[Path], backend: str, precision: str) -> dict[str, Any]:
    """The record entry of ``backend``/``precision`` when ``medseg accelerate`` accepted it for
    exactly ``checkpoints`` (same files, same sha256, same order) and its compiled files are the
    ones it checked (sha256). Raises ``MedsegError`` otherwise, naming the measured Dice or
    saying how to check it."""
    folder = Path(model_dir)
    name = variant_name(backend, precision)
    command = f"medseg accelerate {folder} --manifest POOL.csv --backend {backend} --precision {precision}"
    entry = read_backends_record(folder)["entries"].get(name)
    if not isinstance(entry, dict):
        raise MedsegError(f"{folder}: inference.backend={backend} precision={precision} not checked: run {command}")
    have = [{"file": p.name, "sha256": sha256_file(p)} for p in checkpoints]
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


def fastest_accepted(model_dir: str | Path, checkpoints: Sequence[Path], precision: str) -> tuple[str, str] | None:
    """``inference.backend: auto``: the (backend, precision) that ``medseg accelerate`` accepted
    for exactly ``checkpoints`` and that predicted the cross-validation cases fastest, among the
    variants this machine can run (packages installed; bf16 only on CPUs with fast bf16) and, when
    ``precision`` is not ``auto``, of that precision. ``None``: no such variant (no record, none
    accepted, checkpoints changed since): the caller runs torch."""
    from medseg.runtime import cpu_has_fast_bf16

    folder = Path(model_dir)
    if not (folder / BACKENDS_RECORD).is_file():
        return None
    runnable: list[tuple[float, str, str]] = []
    for entry in read_backends_record(folder)["entries"].values():
        backend, compiled = str(entry.get("backend")), str(entry.get("precision"))
        if not entry.get("accepted") or backend not in BACKENDS or precision not in ("auto", compiled):
            continue
        if not backend_available(backend) or (compiled == "bf16" and not cpu_has_fast_bf16()):
            continue
        try:
            accepted_entry(folder, checkpoints, backend, compiled)
        except MedsegError:
            continue  # checked for other checkpoints or files changed: not a candidate
        seconds = float((entry.get("timings_s") or {}).get("backend_predict", math.inf))
        runnable.append((seconds, backend, compiled))
    if not runnable:
        return None
    _, backend, compiled = min(runnable)
    return backend, compiled


def load_accepted_models(
    model_dir: str | Path, checkpoints: Sequence[Path], models: Sequence[nn.Module], backend: str, precision: str,
    threads: int | None,
) -> list[BackendModel]:
    """The compiled models of an accepted variant (:func:`accepted_entry`), one per checkpoint
    (in order), each with its torch model's ``multiple``."""
    require_backend(backend)
    accepted_entry(model_dir, checkpoints, backend, precision)
    folder = variant_dir(model_dir, backend, precision)
    return [
        load_backend_model(compiled_file(folder, Path(ckpt).stem, backend, precision), backend, precision,
                           int(getattr(model, "multiple", 1)), threads)
        for ckpt, model in zip(checkpoints, models, strict=True)
    ]  # fmt: skip
