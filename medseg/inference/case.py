"""One case end to end: read + preprocess with the checkpoint's own chain -> ``predict_volume``
on the preprocessed (C, R, A, S) grid -> ``Invertd`` of the probabilities onto the source grid
(I, J, K) -> ``postprocess`` there -> lesion instances and table -> atomic writes + completion
marker (:mod:`.outputs`)."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from medseg import __version__
from medseg.errors import MedsegError, printable_path
from medseg.geometry import AXIS_INDEX, index_axis, label_components
from medseg.inference.bundle import InferenceBundle
from medseg.inference.cascade import CascadeStats
from medseg.inference.case_files import CaseWriter, SegExport, discard_case
from medseg.inference.cases import InferenceCase
from medseg.inference.instances import (
    InstancePrediction,
    drop_low_scores,
    instances_in_mask,
    predict_instances,
)
from medseg.inference.lesion_table import lesion_table
from medseg.inference.postprocess import postprocess
from medseg.inference.predictor import predict_volume
from medseg.io import Geometry
from medseg.model_names import is_instance_arch
from medseg.review import qc_columns, read_qc
from medseg.transforms.preprocessing import IMAGE_KEY, channel_key, preprocess_transforms

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- one case


@dataclass
class PreparedCase:
    """A case read and preprocessed: ``data[IMAGE_KEY]`` (C, R, A, S) MetaTensor, source grid."""

    case: InferenceCase
    data: dict[str, Any]
    geometry: Geometry
    seconds: float
    seg_export: SegExport | None = None  # how its DICOM SEG is written (output_format dicom-seg/both)
    detections: InstancePrediction | None = None  # instance models: linked lesions on the preprocessed grid
    cascade: CascadeStats | None = None  # fold ensembles with inference.cascade: what the other models skipped


@dataclass
class CaseResult:
    """Outputs of one case on the source grid (I, J, K); ``cohort``: its row of the run's
    cases table (:func:`cohort_numbers`)."""

    mask: np.ndarray
    lesion_prob: np.ndarray
    lesions: np.ndarray | None
    table: pd.DataFrame | None
    timings: dict[str, float] = field(default_factory=dict)
    cohort: dict[str, Any] = field(default_factory=dict)


def cohort_numbers(mask: np.ndarray, lesions: np.ndarray, n_lesions: int, spacing: tuple[float, ...],
                   slice_axis: int) -> dict[str, Any]:
    """One case's row of ``cases.csv`` (:data:`medseg.outputs.CASES_COLUMNS`, less case_id and
    dicom_seg): ``mask`` and ``lesions`` (I, J, K) on the source grid, lesion ids 1..``n_lesions``;
    volumes in mL from the voxel ``spacing`` (mm); ``slices_with_lesion`` counts the slices along
    file axis ``slice_axis`` (the model's slice plane) that hold any foreground."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    foreground = mask > 0
    sizes = np.bincount(lesions.ravel(), minlength=n_lesions + 1)[1:] if n_lesions else np.zeros(0, np.int64)
    others = tuple(a for a in range(3) if a != slice_axis)
    return {
        "n_lesions": int(n_lesions),
        "total_volume_ml": round(float(foreground.sum()) * voxel_ml, 4),
        "largest_volume_ml": round(float(sizes.max()) * voxel_ml, 4) if sizes.size else 0.0,
        "slices_with_lesion": int(np.any(foreground, axis=others).sum()),
    }


class CasePredictor:
    """Runs cases through one bundle; reusable across cases (the chain is built once)."""

    def __init__(self, bundle: InferenceBundle) -> None:
        self.bundle = bundle
        cfg = bundle.config
        self.chain: Compose = preprocess_transforms(cfg.preprocess, bundle.modality, bundle.channels, with_label=False)
        self.ras_axis = AXIS_INDEX[cfg.preprocess.slice_axis]
        self.qc = read_qc(bundle.model_dir)  # the model folder's QC calibration (review list), if any
        self.detector = is_instance_arch(cfg.model.arch)
        if self.detector and len(bundle.models) > 1:
            raise MedsegError(f"{cfg.model.arch} checkpoints predict lesion instances, which are not averaged across "
                              f"models: give one checkpoint (got {len(bundle.models)})")
        if not self.detector and bundle.inference.min_lesion_score > 0:
            raise MedsegError(f"inference.min_lesion_score filters the learned lesion scores of instance models "
                              f"(maskrcnn); {cfg.model.arch} has none: use min_lesion_mm3 / min_component_fraction")
        if self.detector and bundle.inference.tta:
            raise MedsegError(f"inference.tta is not supported for {cfg.model.arch} (instances are not averaged "
                              "across flips); set inference.tta=false")

    def prepare(self, case: InferenceCase) -> PreparedCase:
        """Read and preprocess ``case`` (raises ``MedsegError`` naming the file; a channel whose
        voxels are all one value, as read, is refused: an empty or failed export)."""
        from medseg.data.volumes import apply_checked_chain

        if case.problem is not None:
            raise MedsegError(f"case {case.case_id}: {case.problem}")
        export = self.seg_export(case)  # a SEG without a DICOM source fails now (preflight refused it already)
        start = time.perf_counter()
        files = {channel_key(c): str(case.images[c]) for c in self.bundle.channels}
        data = apply_checked_chain(self.chain, files, list(files))
        image = data[IMAGE_KEY]
        size = [int(s) for s in np.asarray(image.meta["spatial_shape"])]
        geometry = Geometry.from_affine(np.asarray(image.meta["original_affine"], dtype=np.float64), size)
        return PreparedCase(case, {IMAGE_KEY: image}, geometry, time.perf_counter() - start, export)

    def seg_export(self, case: InferenceCase) -> SegExport | None:
        """How ``case``'s DICOM SEG is written (``inference.output_format`` dicom-seg/both), or
        None (nifti). Raises ``MedsegError`` when its first channel is not a DICOM series folder:
        a SEG references the source instances, which a NIfTI/NRRD/MHA file does not have."""
        cfg = self.bundle.inference
        if cfg.output_format == "nifti":
            return None
        channel = self.bundle.channels[0]
        source = Path(case.images[channel])
        if not source.is_dir():
            raise MedsegError(
                f"case {case.case_id}: inference.output_format={cfg.output_format} writes a DICOM SEG, which needs a "
                f"DICOM series as source; channel {channel} is the file {printable_path(source)} (use output_format=nifti "
                "for such cases)"
            )
        from medseg.dicom.seg_writer import Algorithm

        out_channels = self.bundle.config.model.out_channels  # 1: sigmoid lesion map; K + 1: softmax classes
        n_classes = out_channels - 1 if out_channels > 1 else 1
        return SegExport(source, cfg.dicom_seg, Algorithm.from_checkpoints(self.bundle.checkpoint_sha256()), n_classes,
                         case.new_frame_of_reference)

    def to_source(self, prob: torch.Tensor, prepared: PreparedCase, nearest: bool = False) -> np.ndarray:
        """(K, R, A, S) probabilities on the preprocessed grid -> float32 (K, I, J, K) source grid
        (``nearest``: nearest-neighbour resampling, for label maps)."""
        image = prepared.data[IMAGE_KEY]
        pred = MetaTensor(prob, meta=copy.copy(image.meta), applied_operations=copy.deepcopy(image.applied_operations))
        inverted = Invertd("pred", self.chain, orig_keys=IMAGE_KEY, nearest_interp=nearest)({IMAGE_KEY: image, "pred": pred})
        out = inverted["pred"]
        array = out.as_tensor().numpy() if isinstance(out, MetaTensor) else np.asarray(out)
        return array.astype(np.float32, copy=False)

    def n_slices(self, prepared: PreparedCase) -> int:
        """How many slices :meth:`probabilities` predicts (the progress bar's total)."""
        return int(prepared.data[IMAGE_KEY].shape[self.ras_axis + 1])

    def probabilities(
        self, prepared: PreparedCase, progress: Callable[[int], None] | None = None
    ) -> tuple[torch.Tensor, float]:
        """The network's part: (R, A, S) or (K, R, A, S) probabilities on the preprocessed grid
        (:func:`predict_volume`), and the seconds it took; ``progress`` is called with the number
        of slices done. A fold ensemble predicted as a cascade (``inference.cascade``) leaves what
        its other models skipped in ``prepared.cascade`` (None otherwise).

        Raises ``MedsegError`` when a probability is NaN/Inf (NaN weights, an overflow in reduced
        precision): the image was checked for NaN on reading, so the model is to blame, and a NaN
        map would otherwise be written as an empty mask."""
        start = time.perf_counter()
        if self.detector:
            found = predict_instances(
                self.bundle.models[0], prepared.data[IMAGE_KEY], self.bundle.config.preprocess.context_slices,
                self.bundle.inference, self.bundle.device, axis=self.ras_axis + 1,
            )
            prepared.detections = found
            return found.prob, time.perf_counter() - start
        cascades: list[CascadeStats] = []
        prob = predict_volume(
            self.bundle.models, prepared.data[IMAGE_KEY], self.bundle.config.preprocess.context_slices,
            self.bundle.inference, self.bundle.device, axis=self.ras_axis + 1, progress=progress,
            on_cascade=cascades.append,
        )
        prepared.cascade = cascades[0] if cascades else None
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
        learned = None
        n = 0
        if prepared.detections is not None and (cfg.write_lesions or cfg.min_lesion_score > 0):
            # the model's own instances and learned scores, cut to the post-processed mask
            found = prepared.detections
            ids = torch.from_numpy(found.instances.astype(np.float32))[None]
            ids_src = self.to_source(ids, prepared, nearest=True)[0].round().astype(np.int32)
            lesions, n, mean, best = instances_in_mask(mask, ids_src, found.score_mean, found.score_max)
            if n and cfg.min_lesion_score > 0:
                lesions, n, mean, best = drop_low_scores(lesions, mean, best, cfg.min_lesion_score)
                mask = (lesions > 0).astype(np.uint8)  # the instances cover the mask: what is left of it
            learned = (mean, best)
        if writer is not None:
            if cfg.output_format != "dicom-seg":
                writer.mask(mask)
            if prepared.seg_export is not None:
                writer.dicom_seg(prepared.seg_export, mask, lesion_prob)
            if cfg.write_prob:
                writer.probability(lesion_prob)
        table = None
        if n == 0:
            lesions, n = label_components(mask, cfg.connectivity)
            learned = None
        affine = prepared.geometry.affine
        cohort = cohort_numbers(mask, lesions, n, spacing, index_axis(affine, self.ras_axis))
        cohort.update(qc_columns(lesion_prob, self.qc))
        if not cfg.write_lesions:
            lesions = None
        else:
            if writer is not None:
                writer.lesions(lesions, n)
            table = lesion_table(
                lesions, n, lesion_prob, affine, spacing, index_axis(affine, self.ras_axis),
                classes=mask if prob_src.shape[0] > 1 else None, learned_scores=learned,
            )
            if writer is not None:
                writer.table(table)
        timings["postprocess"] = time.perf_counter() - start
        return CaseResult(mask, lesion_prob, lesions, table, timings, cohort)

    def finish_and_write(
        self, prepared: PreparedCase, prob: torch.Tensor, predict_seconds: float, out_dir: Path, fingerprint: str,
        inputs: dict[str, Any] | None = None,
    ) -> list[Path]:
        """:meth:`finish` with every output written on the source grid (:class:`.outputs.CaseWriter`),
        each file while the next output is computed (a BraTS case: 88 -> 74 ms against finishing
        first and writing after), the marker last, with the case's ``inputs`` identity
        (:mod:`medseg.input_identity`). Returns the written paths."""
        with CaseWriter(out_dir, prepared.case.case_id, prepared.geometry, fingerprint, inputs) as writer:
            result = self.finish(prepared, prob, predict_seconds, writer)
            info: dict[str, Any] = {
                "medseg_version": __version__, "n_lesions": None if result.table is None else len(result.table),
                "cohort": result.cohort, "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
            }
            if prepared.cascade is not None:
                info["cascade"] = prepared.cascade.as_record()
            return writer.close(info)

    def run_case(self, case: InferenceCase, out_dir: str | Path) -> list[Path]:
        """One case end to end (no prefetch): read, preprocess, predict, post-process, write."""
        out = Path(out_dir)
        discard_case(out, case.case_id)
        prepared = self.prepare(case)
        prob, seconds = self.probabilities(prepared)
        return self.finish_and_write(prepared, prob, seconds, out, self.bundle.fingerprint())


