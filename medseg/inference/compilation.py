"""Compiling a fold model for a runtime backend (:mod:`.backends`): the ONNX export, int8
post-training static quantization (ONNX Runtime QDQ, OpenVINO through NNCF) and the calibration
stacks it is calibrated on (training cases through medseg's own preprocessing, half of the
stacks from slices with lesion). Files are written atomically; what to load and whether a
compiled model may be used are :mod:`.backends`' job."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.atomic import atomic_path
from medseg.errors import MedsegError
from medseg.inference.backends import IR_SUFFIXES, ONNX_SUFFIX, compiled_file, require_backend, variant_name

log = logging.getLogger(__name__)


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


