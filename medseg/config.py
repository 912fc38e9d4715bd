"""Pydantic models of every config section, and ``load_config(path, overrides)``.

Every section forbids unknown keys, so a typo fails at load time naming the key.
Config files name registry keys (``model: {arch: unet_inception}``), never import paths.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from medseg.errors import ConfigError
from medseg.model_names import (
    ARCHITECTURE_OPTIONS,
    ENCODER_OPTIONS,
    OPTION_FIELDS,
    builtin_only_settings,
    is_monai_arch,
    known_names,
    monai_network_name,
    plugin_entry_points,
    unset_fix,
    unsupported_options,
)
from medseg.pacs.config import PacsConfig
from medseg.text_input import read_user_yaml

log = logging.getLogger(__name__)


class StrictModel(BaseModel):
    """Base of all config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LabelConfig(StrictModel):
    """How raw label-file values map to the binary lesion mask.

    ``foreground``: ``"nonzero"`` (every value > 0 is lesion, e.g. BraTS whole tumour or 0/255
    masks) or an explicit list of raw values that count as lesion (e.g. ``[1, 4]`` for BraTS
    tumour core). ``allowed_values``: raw values that may appear at all; any other value is
    an error naming the file (``None`` accepts any integer value).
    ``instances``: what one lesion is, for instance models (``maskrcnn``) and lesion-wise
    evaluation of their outputs: ``components`` (a connected component of the mask; touching
    lesions merge) or ``values`` (every distinct foreground value is one lesion: an
    instance-labelled reference, where touching lesions keep their own ids).

    Plausibility (an image given as the label would otherwise become one huge "lesion"):
    ``max_foreground_fraction``: a label whose lesion mask covers more than this share of its
    volume is refused, naming the file (``None`` switches the check off).
    ``max_distinct_values``: without ``allowed_values``, a label holding more distinct values
    than this is refused as "an image, not a label" (``None`` switches it off; an
    instance-labelled reference with many lesions raises it or lists ``allowed_values``).
    """

    foreground: Literal["nonzero"] | list[int] = "nonzero"
    allowed_values: list[int] | None = None
    instances: Literal["components", "values"] = "components"
    max_foreground_fraction: Annotated[float, Field(gt=0, le=1)] | None = 0.5
    max_distinct_values: Annotated[int, Field(ge=2)] | None = 32

    @field_validator("foreground")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("foreground must be 'nonzero' or a non-empty list of label values")
        return value


AxisName = Literal["axial", "coronal", "sagittal"]


class StatsConfig(StrictModel):
    """Per-slice lesion statistics and the lesion-distribution curve.

    ``axis``: slicing axis of the RAS-oriented volume (axial = S, coronal = A, sagittal = R).
    ``extent``: what the normalised position [0, 1] spans: ``foreground`` = slices whose image
    (first channel) exceeds ``foreground_threshold`` (body/brain extent; ``None`` = automatic,
    Otsu-like: the image's 10th percentile plus 5% of its range for MR, -500 HU for CT),
    ``volume`` = every slice of the volume.
    ``n_bins``: points of the normalised curve. ``connectivity_2d``: 4 or 8 (in-plane
    components); ``connectivity_3d``: 6, 18 or 26 (3-D lesions).
    ``include_patient_id``: also write the manifest's ``patient_id`` into ``case_stats.csv``
    (default: outputs carry ``case_id`` only).
    """

    axis: AxisName = "axial"
    extent: Literal["foreground", "volume"] = "foreground"
    foreground_threshold: float | None = None
    n_bins: int = Field(default=101, ge=2, le=10001)
    connectivity_2d: Literal[4, 8] = 8
    connectivity_3d: Literal[6, 18, 26] = 26
    include_patient_id: bool = False


class DataConfig(StrictModel):
    """Where the data is and how labels are read."""

    manifest: str = "data_manifest.csv"
    labels: LabelConfig = Field(default_factory=LabelConfig)


class RegionConfig(StrictModel):
    """One evaluated region: which raw reference values and which predicted classes form it.

    ``reference_values``: raw values of the label file (before ``data.labels`` mapping), e.g.
    ``[1, 2, 4]`` for BraTS whole tumour. ``prediction_values``: predicted class indices that
    form the region (multi-class models); ``None`` = every non-zero predicted voxel (binary).
    """

    reference_values: list[int] = Field(min_length=1)
    prediction_values: list[int] | None = None

    @field_validator("prediction_values")
    @classmethod
    def _non_empty_prediction(cls, value: Any) -> Any:
        if value is not None and not value:
            raise ValueError("prediction_values must be null (prediction > 0) or a non-empty list")
        return value


class EvaluationConfig(StrictModel):
    """``medseg evaluate``: metrics of predicted masks against reference labels.

    ``regions``: ``{name: [raw reference values]}`` or ``{name: {reference_values: [...],
    prediction_values: [...]}}``; empty (default) = one region ``lesion``: the reference mapped
    by ``data.labels`` against prediction > 0. ``connectivity``: 3-D lesion components (6, 18,
    26). ``matching``: ``iou`` (one-to-one, IoU > ``iou_threshold``, LiTS) or ``overlap`` (any
    shared voxel, BraTS). ``ap_iou_thresholds``: IoU thresholds of the AP/mAP average
    (``iou_threshold`` is always evaluated too). ``size_edges_mm3``: small < edge0 <= medium <
    edge1 <= large (lesion-recall buckets). ``slice_axis``: per-slice detection direction of the
    RAS-oriented volume. ``surface_distances``: compute HD95/ASSD. ``split``: evaluate only
    manifest rows of this split (``None`` = all rows with a label).
    """

    regions: dict[str, RegionConfig] = Field(default_factory=dict)
    connectivity: Literal[6, 18, 26] = 26
    matching: Literal["iou", "overlap"] = "iou"
    iou_threshold: float = Field(default=0.5, ge=0.0, lt=1.0)
    ap_iou_thresholds: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5])
    size_edges_mm3: tuple[float, float] = (500.0, 5000.0)
    slice_axis: AxisName = "axial"
    surface_distances: bool = True
    split: Literal["train", "val", "test"] | None = None

    @field_validator("regions", mode="before")
    @classmethod
    def _region_shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"reference_values": v} if isinstance(v, list) else v for k, v in value.items()}
        return value

    @field_validator("ap_iou_thresholds")
    @classmethod
    def _thresholds_in_range(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 <= t < 1.0 for t in value):
            raise ValueError("ap_iou_thresholds must be a non-empty list of values in [0, 1)")
        return value

    @field_validator("size_edges_mm3")
    @classmethod
    def _increasing(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < value[0] < value[1]:
            raise ValueError("size_edges_mm3 must be two increasing positive volumes, e.g. [500, 5000]")
        return value


class ModelConfig(StrictModel):
    """Network: registry names (``arch``, ``encoder``) plus optional settings.

    ``arch``: ``unet`` | ``unet_inception`` | ``deeplabv3plus`` | ``segnet`` (encoder ``unet``
    only: max-unpooling needs pooling indices) | ``maskrcnn`` (lesion instances with learned
    scores; ``out_channels`` 1); ``encoder``: ``unet`` |
    ``resnet18`` | ``resnet34`` | ``resnet50`` | ``xception`` (see ``medseg models``).
    ``in_channels``: modalities x context slices (2.5D: e.g. 3 modalities x 3 slices = 9).
    Settings left at None take the architecture's default; a setting the chosen architecture
    and encoder cannot honour is an error (naming the ``--set`` that unsets it), except that with
    ``arch: monai:<Name>`` or a plug-in architecture the built-in architectures' settings below
    are dropped with one log line naming them (so swapping the architecture is one ``--set
    model.arch=...`` on any config). ``width``: multiplier of every channel count (1.0).
    ``decoder_channels``: U-Net up-block widths, deepest first (default: halve from the
    bottleneck). ``residual``: MONAI residual units in the U-Net conv blocks (false).
    ``inception_branches``: 1x1 / 3x3 / 5x5 / pool branch widths as fractions of the skip's
    channels (0.25, 0.5, 0.125, 0.125). ``output_stride``: DeepLabv3+ 8 or 16 (16).
    ``aspp_rates``: three atrous rates (6, 12, 18 at OS16; 12, 24, 36 at OS8).
    ``aspp_channels``: DeepLabv3+ ASPP/decoder width (256 x width). ``dropout``: U-Net decoder
    blocks (0) / after the ASPP projection (0.1). ``norm``: ``batch`` | ``instance`` (batch).
    ``anchor_sizes``: Mask R-CNN anchor side per FPN level in pixels, smallest first (None: the
    trainer sizes them from the training lesions and stores them in the run's config).
    ``arch: monai:<Name>`` builds a MONAI 2-D network (``medseg models`` lists them) with
    ``options`` passed to its constructor (spatial_dims, in/out channels filled in; ``encoder``
    is not used); plug-in architectures/encoders (entry-point group ``medseg.models``) also take
    ``options``. ``pretrained``: local file of encoder weights (never downloaded; the old key
    ``pretrained_path`` is accepted), with key names of ``pretrained_map`` (``medseg`` |
    ``torchvision`` | ``timm`` | ``monai``; :mod:`medseg.models.pretrained`); a key that does
    not fit is an error unless ``pretrained_strict`` is false.
    """

    arch: str = "unet_inception"
    encoder: str = "resnet34"
    in_channels: int = Field(default=3, ge=1)
    out_channels: int = Field(default=1, ge=1)
    width: float | None = Field(default=None, gt=0)
    decoder_channels: list[Annotated[int, Field(ge=1)]] | None = None
    residual: bool | None = None
    inception_branches: list[Annotated[float, Field(gt=0)]] | None = Field(
        default=None, min_length=4, max_length=4
    )
    output_stride: Literal[8, 16] | None = None
    aspp_rates: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, min_length=3, max_length=3)
    aspp_channels: int | None = Field(default=None, ge=1)
    dropout: float | None = Field(default=None, ge=0, lt=1)
    norm: Literal["batch", "instance"] | None = None
    anchor_sizes: list[Annotated[float, Field(gt=0)]] | None = Field(default=None, min_length=1, max_length=4)
    options: dict[str, Any] | None = None
    pretrained: str | None = Field(default=None, validation_alias=AliasChoices("pretrained", "pretrained_path"))
    pretrained_map: Literal["medseg", "torchvision", "timm", "monai"] = "medseg"
    pretrained_strict: bool = True

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if is_monai_arch(value):
            monai_network_name(value)  # ValueError naming the listed networks
            return value
        if value not in ARCHITECTURE_OPTIONS and value not in plugin_entry_points()["arch"]:
            raise ValueError(f"unknown arch {value!r}; valid: {', '.join(known_names('arch'))}")
        return value

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        if value not in ENCODER_OPTIONS and value not in plugin_entry_points()["encoder"]:
            raise ValueError(f"unknown encoder {value!r}; valid: {', '.join(known_names('encoder'))}")
        return value

    @field_validator("pretrained")
    @classmethod
    def _local_path(cls, value: str | None) -> str | None:
        if value is not None and "://" in value:
            raise ValueError("pretrained must be a local file path (weights are never downloaded)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _drop_builtin_settings(cls, data: Any) -> Any:
        """With ``arch`` a MONAI network or a plug-in, drop the built-in architectures' settings
        (:func:`medseg.model_names.builtin_only_settings`) and log one line naming them."""
        if not isinstance(data, dict):
            return data
        arch = data.get("arch")
        if not isinstance(arch, str) or not (is_monai_arch(arch) or arch in plugin_entry_points()["arch"]):
            return data  # a built-in architecture (checked after), or an unknown name (the arch field says so)
        dropped = builtin_only_settings(arch, data)
        if dropped:
            log.warning("model.arch %s: dropped model.%s (settings of the built-in architectures; %s takes its own "
                        "in model.options)", arch, ", model.".join(dropped), arch)
            data = {**data, **dict.fromkeys(dropped)}  # None: the model's default (keys kept for assignment)
        return data

    @model_validator(mode="after")
    def _settings_supported(self) -> ModelConfig:
        options = {k: getattr(self, k) for k in OPTION_FIELDS if getattr(self, k) is not None}
        problem = unsupported_options(self.arch, self.encoder, options)
        if problem is not None:
            raise ValueError(problem)
        builtin = self.arch in ARCHITECTURE_OPTIONS and self.encoder in ENCODER_OPTIONS
        if self.options and builtin:
            raise ValueError(f"model.options is for monai:<Name> and plug-in models; {self.arch!r} on "
                             f"{self.encoder!r} takes the model.* settings ({', '.join(OPTION_FIELDS)}); to drop "
                             f"them: {unset_fix(['options'])}")
        return self


class PreprocessConfig(StrictModel):
    """Preprocessing shared by training and inference (stored in every checkpoint).

    ``slice_axis``: 2-D slices are taken normal to this axis of the RAS-oriented volume.
    ``context_slices``: k neighbours on each side (2.5D: 2k+1 slices x channels = in_channels).
    ``spacing_inplane``: resample in-plane to this spacing in mm (``None`` = native grid).
    ``ct_window``: HU window [low, high] scaled to [0, 1]. ``ct_body_hu``: body threshold.
    ``mr_percentiles``: foreground percentiles clipped before the z-score.
    ``crop_foreground``: crop to the body/brain box + ``crop_margin`` voxels in-plane and
    ``crop_margin_slices`` along the slice axis (slices outside need no prediction).
    """

    slice_axis: AxisName = "axial"
    context_slices: int = Field(default=1, ge=0, le=8)
    spacing_inplane: tuple[float, float] | None = None
    ct_window: tuple[float, float] = (-160.0, 240.0)
    ct_body_hu: float = -500.0
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    crop_foreground: bool = True
    crop_margin: int = Field(default=8, ge=0)
    crop_margin_slices: int = Field(default=2, ge=0)

    @field_validator("ct_window", "mr_percentiles")
    @classmethod
    def _increasing_pair(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError("must be two increasing numbers [low, high]")
        return value

    @field_validator("spacing_inplane")
    @classmethod
    def _positive_spacing(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and min(value) <= 0:
            raise ValueError("spacing_inplane must be two positive numbers (mm) or null")
        return value


class CodeConfig(StrictModel):
    """A coded concept (DICOM Code Sequence item): ``value`` in coding ``scheme`` (SCT = SNOMED CT,
    DCM = DICOM), ``meaning`` its human-readable name."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(default="SCT", min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


class DicomSegConfig(StrictModel):
    """The DICOM Segmentation medseg writes (``inference.output_format`` dicom-seg/both, ``medseg
    export-seg``; :mod:`medseg.dicom.seg_writer`).

    One segment ``segment_label`` coded as ``category`` / ``property_type`` (default SNOMED CT
    "Morphologically Abnormal Structure" / "Lesion"; multi-class models get one segment per
    class, ``<segment_label> class <k>``). ``fractional``: a FRACTIONAL (probability, 8 bit) SEG
    from the lesion probability instead of the BINARY mask (binary models only). The SEG is a
    new series ``series_number`` / ``series_description`` in the source's study.
    ``missing_frame_of_reference``: a source series without a Frame of Reference UID is refused
    before inference (``refuse``, the message names this setting) or gets a ``new`` UID, derived
    from the source series so reruns agree, noted in the SEG's series description."""

    segment_label: str = Field(default="lesion", min_length=1, max_length=64)
    category: CodeConfig = Field(default_factory=lambda: CodeConfig(
        value="49755003", scheme="SCT", meaning="Morphologically Abnormal Structure"))
    property_type: CodeConfig = Field(default_factory=lambda: CodeConfig(value="52988006", scheme="SCT", meaning="Lesion"))
    fractional: bool = False
    series_number: int = Field(default=9001, ge=1, le=2**31 - 1)
    series_description: str = Field(default="medseg lesion segmentation", max_length=64)
    # a source series without a Frame of Reference UID (anonymised or legacy exports): refuse it
    # before inference (the case's NIfTI outputs are still written with output_format both), or
    # give the SEG a new frame of reference (a UID derived from the source series; said in the SEG's
    # series description and the run's cases.csv)
    missing_frame_of_reference: Literal["refuse", "new"] = "refuse"


class InferenceConfig(StrictModel):
    """``medseg infer``: whole-volume 2.5D sliding-window prediction and post-processing.

    Prediction: ``roi_size`` is the in-plane sliding window (pixels); a slice that fits in it is
    predicted as one window (the window shrinks to the slice, which sits on the network's
    pooling grid where the ``roi_size`` window would put it: centred, modulo the stride), larger
    slices are tiled with ``overlap`` and ``blend`` weighting (MONAI ``SlidingWindowInferer``). ``batch_size``:
    windows per forward pass (``None``: 4 on CPU, 32 on CUDA; see docs/benchmarks.md).
    ``precision``: ``auto`` = bf16 autocast on CPUs with AVX-512/AMX and on CUDA GPUs that
    support it (else fp16 on CUDA, fp32 on other CPUs); ``fp32`` | ``bf16`` | ``fp16`` force one.
    ``channels_last``: NHWC memory format for the forward pass. ``threads``: CPU threads of
    ``medseg infer`` (``torch.set_num_threads``; ``None`` = torch's default, one per core; on a
    CPU shared with other jobs 1 can be several times faster, see docs/benchmarks.md).
    ``tta``: average over in-plane flips ``tta_flips`` (0 = first, 1 = second in-plane axis)
    besides the plain prediction.

    Post-processing (:func:`medseg.inference.postprocess`): binary models threshold the
    probability at ``threshold`` (voxel is lesion when ``prob >= threshold``), multi-class models
    take the argmax; then optional ``fill_holes`` (MONAI ``FillHoles``) and
    ``largest_component`` (MONAI ``KeepLargestConnectedComponent``); then lesions (3-D
    components, ``connectivity``) smaller than ``min_lesion_mm3`` are removed, and with
    ``min_component_fraction`` > 0 those smaller than that fraction of the largest lesion
    (0.1: keep every lesion of at least a tenth of the largest one's voxels; 1: the largest
    only). ``medseg run pipelines/auto.yaml`` chooses these on cross-validation. Instance models
    (``maskrcnn``) only: ``min_lesion_score`` drops the lesions whose learned score is below it
    from the mask and the tables (0 keeps all; choose it on training or validation cases, e.g.
    where their lesion F1 peaks, never on the cases you report).

    Outputs (:mod:`medseg.outputs`): ``write_prob`` adds the probability map; ``write_lesions`` the instance map and
    lesion table. ``output_format``: ``nifti`` (the NIfTI mask), ``dicom-seg``
    (the mask as a DICOM Segmentation referencing the source series, settings
    ``dicom_seg``; no NIfTI mask, so ``evaluate``/``stats`` have nothing to read) or ``both``;
    with dicom-seg/both a case whose image is not a DICOM series fails (clear error in failures.csv). ``prefetch``: in a batch, read and preprocess the next case and post-process
    and write the previous one in background threads while the network predicts this one
    (``auto``: on CUDA, where the GPU otherwise waits for the CPU's I/O -- 4 BraTS cases on an
    H200: 1.04 s with it, 1.70 s without; off on a CPU, where all of it competes for the same
    cores; docs/benchmarks.md). ``keep_freed_memory``: the inference process keeps memory it
    frees for reuse instead of returning it to the system (glibc; :func:`medseg.runtime.keep_freed_memory`): the
    next large buffer then needs no fresh zeroed pages (a BraTS case: ~88,000 page faults ->
    ~4,000, the work around the network 1.16x faster); the peak grows a little (960 -> 1089 MB
    over 36 BraTS cases) and the process holds it until it exits.

    Fold ensembles (several models, e.g. a model folder; :mod:`medseg.inference.cascade`):
    with ``cascade`` the first model predicts every slice and the others only the slices, and
    in-plane boxes, where that first pass is not confidently background: a slice is skipped when
    its first-pass probability stays below ``cascade_threshold`` everywhere and on the
    ``cascade_margin_slices`` slices on each side of it; on the other slices the remaining models
    see the whole slice (``cascade_margin_px`` ``None``, exact for any network) or only the box
    around the first pass's pixels at or above ``cascade_threshold``, grown by
    ``cascade_margin_px`` pixels and snapped to the network's pooling grid (for fully convolutional
    networks; DeepLabV3+'s image pooling sees the whole slice, so boxes change its masks).
    Elsewhere the first model's probability stands. The fraction of slices and pixels skipped goes into the run's
    record. ``cascade: false`` runs every model on every slice. ``student``: ``auto`` runs a
    model folder's distilled student instead of its folds when ``medseg distill`` accepted it
    (its out-of-fold Dice within the margin of the ensemble's; :mod:`medseg.auto.distill`),
    ``false`` (or ``off``) always runs the fold ensemble, ``true`` requires the student.

    Runtime (:mod:`medseg.inference.backends`): ``backend`` ``torch`` (eager PyTorch) or
    ``onnxruntime`` / ``openvino`` (the ONNX export of each model; ``pip install medseg[fast]``).
    With those, ``precision`` ``fp32``, ``bf16`` (CPUs with AVX-512 bf16 / AMX) or ``int8``
    (post-training static quantization calibrated on training slices) picks the compiled
    precision (``auto`` = fp32). A model folder accepts a backend and precision only after
    ``medseg accelerate`` has checked that its masks match the fp32 torch ensemble on the
    cross-validation patients (Dice >= 0.995 per case); otherwise inference refuses it and names
    the measured Dice. ``auto`` (the default): a model folder on the CPU runs the accepted
    variant that predicted its cross-validation cases fastest (of ``precision`` unless that is
    ``auto``), everything else torch; the run's record names what ran.
    """

    roi_size: tuple[int, int] = (512, 512)
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    blend: Literal["gaussian", "constant"] = "gaussian"
    batch_size: int | None = Field(default=None, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"
    channels_last: bool = True
    threads: int | None = Field(default=None, ge=1)
    tta: bool = False
    tta_flips: list[list[Literal[0, 1]]] = Field(default_factory=lambda: [[0], [1], [0, 1]])
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    min_lesion_mm3: float = Field(default=10.0, ge=0.0)
    fill_holes: bool = False
    largest_component: bool = False
    min_component_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    min_lesion_score: float = Field(default=0.0, ge=0.0, lt=1.0)
    connectivity: Literal[6, 18, 26] = 26
    write_prob: bool = False
    write_lesions: bool = True
    prefetch: bool | Literal["auto"] = "auto"
    keep_freed_memory: bool = True
    output_format: Literal["nifti", "dicom-seg", "both"] = "nifti"
    dicom_seg: DicomSegConfig = Field(default_factory=DicomSegConfig)
    cascade: bool = True
    cascade_threshold: float = Field(default=0.05, gt=0.0, lt=0.5)
    cascade_margin_slices: int = Field(default=2, ge=0)
    cascade_margin_px: int | None = Field(default=None, ge=0)
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = "auto"
    student: bool | Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _precision_fits_backend(self) -> InferenceConfig:
        if self.precision == "int8" and self.backend == "torch":  # auto: an accepted int8 variant, else refused at load
            raise ValueError("precision int8 needs backend onnxruntime or openvino (eager torch has no int8 path here)")
        if self.precision == "fp16" and self.backend != "torch":
            raise ValueError(f"precision fp16 is a CUDA autocast setting; backend {self.backend} runs fp32, bf16 or int8")
        return self

    @field_validator("roi_size")
    @classmethod
    def _positive_roi(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 1:
            raise ValueError("roi_size must be two positive pixel counts, e.g. [512, 512]")
        return value

    @field_validator("tta_flips")
    @classmethod
    def _flips_valid(cls, value: list[list[int]]) -> list[list[int]]:
        if any(not flip or len(set(flip)) != len(flip) for flip in value):
            raise ValueError("tta_flips must be non-empty lists of distinct in-plane axes 0/1, e.g. [[0], [1], [0, 1]]")
        return value


class AugmentConfig(StrictModel):
    """2-D augmentation of training slices (MONAI ``Rand*d``; image and label move together).

    Probabilities are per sample. ``flip_axes``: in-plane axes flipped, each with probability
    ``flip_prob`` (0 = first in-plane axis, e.g. R for axial slices). ``affine_prob``: rotation
    by up to +-``rotate_deg`` degrees and zoom by up to +-``scale`` (0.15 = 0.85-1.15).
    ``elastic_prob``: elastic deformation with control points every ``elastic_spacing``
    pixels displaced by ``elastic_magnitude`` (MONAI ``Rand2DElasticd``). Intensity (on the
    normalised image): ``intensity_prob`` scales each modality by its own 1 +- ``intensity_scale``
    and shifts it by its own +-``intensity_shift`` (the same for all its context slices, as a
    different scanner or normalisation would); ``contrast_prob`` applies a gamma drawn from ``gamma``;
    ``noise_prob`` adds Gaussian noise of std ``noise_std``; ``blur_prob`` Gaussian blur with a
    sigma drawn from ``blur_sigma`` pixels. ``translate``: the training crop may reach up to this
    fraction of the patch size beyond each slice border (image edge-replicated, label
    background), so anatomy lands at every offset of the network's pooling grid and beside
    frames of background, as it does when inference pads or tiles a slice. ``enabled: false``
    turns every random transform off (the patch crop stays, without the margin).
    """

    enabled: bool = True
    flip_axes: list[Literal[0, 1]] = Field(default_factory=lambda: [0, 1])
    flip_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    affine_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    rotate_deg: float = Field(default=15.0, ge=0.0, le=180.0)
    scale: float = Field(default=0.15, ge=0.0, lt=1.0)
    elastic_prob: float = Field(default=0.2, ge=0.0, le=1.0)
    elastic_spacing: int = Field(default=24, ge=2)
    elastic_magnitude: tuple[float, float] = (1.0, 2.0)
    intensity_prob: float = Field(default=0.3, ge=0.0, le=1.0)
    intensity_scale: float = Field(default=0.1, ge=0.0)
    intensity_shift: float = Field(default=0.1, ge=0.0)
    contrast_prob: float = Field(default=0.3, ge=0.0, le=1.0)
    gamma: tuple[float, float] = (0.7, 1.5)
    noise_prob: float = Field(default=0.15, ge=0.0, le=1.0)
    noise_std: float = Field(default=0.1, ge=0.0)
    blur_prob: float = Field(default=0.1, ge=0.0, le=1.0)
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    translate: float = Field(default=0.15, ge=0.0, le=0.45)

    @field_validator("elastic_magnitude", "gamma", "blur_sigma")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < value[0] <= value[1]:
            raise ValueError("must be a range [low, high] with 0 < low <= high")
        return value


class OptimizerConfig(StrictModel):
    """``name``: ``adamw`` (decoupled ``weight_decay``) or ``sgd`` (``momentum``, ``nesterov``).

    ``lr`` is the peak learning rate reached after the warm-up."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    momentum: float = Field(default=0.99, ge=0.0, lt=1.0)
    nesterov: bool = True


class ScheduleConfig(StrictModel):
    """Learning-rate schedule, stepped every iteration.

    Linear warm-up from ``lr * warmup_start`` over ``warmup_epochs`` epochs, then ``poly``
    (``lr * (1 - t) ** power``), ``cosine`` (from ``lr`` down to ``lr * min_lr_ratio``) or
    ``constant``; ``t`` runs from 0 after the warm-up to 1 at the last step of ``train.epochs``.
    """

    name: Literal["poly", "cosine", "constant"] = "poly"
    warmup_epochs: float = Field(default=1.0, ge=0.0)
    warmup_start: float = Field(default=0.01, gt=0.0, le=1.0)
    power: float = Field(default=0.9, gt=0.0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)


class LossConfig(StrictModel):
    """Dice + cross-entropy (MONAI ``DiceCELoss``): BCE on a sigmoid for one output channel
    (binary lesion mask), softmax CE for several classes. ``dice_weight`` and ``ce_weight``
    weight the two terms; ``batch_dice``: one Dice over the whole batch (robust to slices
    without lesion) instead of a mean of per-slice Dices."""

    dice_weight: float = Field(default=1.0, ge=0.0)
    ce_weight: float = Field(default=1.0, ge=0.0)
    batch_dice: bool = True

    @model_validator(mode="after")
    def _some_term(self) -> LossConfig:
        if self.dice_weight == 0 and self.ce_weight == 0:
            raise ValueError("dice_weight and ce_weight cannot both be 0")
        return self


class TrainConfig(StrictModel):
    """``medseg train``: 2.5D slice training on the manifest's ``train`` split, validated on
    whole ``val`` volumes (post-processed with the ``inference`` settings).

    Sampling: each epoch draws ``samples_per_epoch`` slices (over all ranks), batches of
    ``batch_size`` per rank of which a share ``lesion_fraction`` comes from slices holding
    lesion and the rest from slices without; ``patch_size`` is the training crop (pixels,
    in-plane axes in order; smaller slices are padded), centred on a lesion pixel with
    probability ``lesion_crop_prob`` for lesion slices. ``cache_dir``: on-disk cache of the
    preprocessed volumes, keyed by a fingerprint of the files and the preprocessing config
    (``null``: keep them in memory only). ``num_workers``/``prefetch_factor``: DataLoader
    workers per rank.

    Precision and speed: ``amp``: ``auto`` = bf16 autocast on CUDA GPUs that support it (else
    fp16 with a gradient scaler) and on CPUs with AVX-512 BF16 / AMX, fp32 on other CPUs;
    ``bf16`` | ``fp16`` | ``off`` force one. ``channels_last``: NHWC weights and inputs.
    ``threads``: ``torch.set_num_threads`` per rank (``null``: PyTorch's default; 1 is much
    faster on a CPU shared with other jobs). ``grad_clip``: max gradient norm (``null``: off).

    Stopping: at most ``epochs``; ``patience`` validations without a Dice improvement larger
    than ``min_delta`` stop early (``null``: never); ``max_minutes`` stops before an epoch that
    would end past the budget, and when the first epoch shows that fewer than ``epochs`` fit,
    the learning-rate schedule is shortened to end with the last epoch that fits (logged,
    saved for resume) rather than being cut off at a high rate. ``val_every``: epochs between validations;
    ``val_batch_size``: slices per forward pass there (``null``: ``inference.batch_size``). ``save_every``:
    also keep ``epoch_NNN.pt`` every so many epochs (``null``: only ``best.pt`` and ``last.pt``).
    ``seed`` seeds the model initialisation, sampling and augmentation (the same seed gives
    the same run on the CPU); ``deterministic`` also asks PyTorch for deterministic kernels.
    ``ema_decay``: validate and save an exponential moving average of the weights with this
    decay (``medseg.engine.ema``; ``null``: the raw weights).
    """

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    epochs: int = Field(default=100, ge=1)
    samples_per_epoch: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=16, ge=1)
    patch_size: tuple[int, int] = (192, 192)
    lesion_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    lesion_crop_prob: float = Field(default=0.9, ge=0.0, le=1.0)
    cache_dir: str | None = None
    num_workers: int = Field(default=2, ge=0)
    prefetch_factor: int = Field(default=2, ge=1)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    threads: int | None = Field(default=None, ge=1)
    grad_clip: float | None = Field(default=5.0, gt=0.0)
    val_every: int = Field(default=1, ge=1)
    val_batch_size: int | None = Field(default=None, ge=1)
    patience: int | None = Field(default=20, ge=1)
    min_delta: float = Field(default=0.0, ge=0.0)
    max_minutes: float | None = Field(default=None, gt=0.0)
    save_every: int | None = Field(default=None, ge=1)
    deterministic: bool = True
    ema_decay: float | None = Field(default=0.995, ge=0.0, lt=1.0)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("patch_size")
    @classmethod
    def _positive_patch(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 8:
            raise ValueError("patch_size must be two pixel counts >= 8, e.g. [192, 192]")
        return value


class PostprocessSearchConfig(StrictModel):
    """Post-processing candidates scored on the out-of-fold predictions (``cv`` stage, then
    ``postprocess`` stage; :mod:`medseg.auto.postprocess_selection`).

    The grid is every combination of ``thresholds`` x ``min_lesion_mm3`` x
    ``component_fractions`` (0 = keep every component, 1 = the largest only; see
    ``inference.min_component_fraction``) x ``fill_holes``. The rule with the best mean
    out-of-fold Dice wins; among rules within ``dice_tolerance`` of it, the one with the lowest
    mean HD95. The config's own rule is kept unless the winner beats its mean Dice by more than
    ``min_gain`` or its HD95 by more than ``min_hd95_gain_mm`` at no loss of Dice (a gain
    smaller than that is noise on a few patients, not a rule worth shipping).

    ``objective`` (lesions, not only voxels): ``dice`` ranks as above. ``lesion_f1`` and ``both``
    first restrict the candidates to those whose mean out-of-fold lesion F1 (lesions matched as
    ``evaluation.matching`` does) lies within a margin of the best one -- 0 for ``lesion_f1``,
    ``lesion_f1_margin`` for ``both`` -- and then apply the Dice rule above among them; the
    config's own rule is replaced when it falls outside that set. For metastases or MS plaques,
    where a rule that drops small components wins Dice by deleting whole lesions, ``both`` keeps
    the lesions; the plan chooses ``both`` for pools with several lesions per case.
    """

    thresholds: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7], min_length=1
    )
    min_lesion_mm3: list[Annotated[float, Field(ge=0.0)]] = Field(
        default_factory=lambda: [0.0, 10.0, 100.0, 500.0, 1000.0], min_length=1
    )
    component_fractions: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.0, 0.1, 0.25, 1.0], min_length=1
    )
    fill_holes: list[bool] = Field(default_factory=lambda: [False, True], min_length=1)
    dice_tolerance: float = Field(default=0.005, ge=0.0)
    min_gain: float = Field(default=0.002, ge=0.0)
    min_hd95_gain_mm: float = Field(default=1.0, ge=0.0)
    objective: Literal["dice", "lesion_f1", "both"] = "dice"
    lesion_f1_margin: float = Field(default=0.02, ge=0.0, le=1.0)


class CandidateConfig(StrictModel):
    """One configuration of ``cv.candidates``: a ``name`` (its folder ``cv/candidates/<name>``)
    and the dotted ``model.*`` / ``train.*`` settings it changes over the run's config, e.g.
    ``{name: unet, set: {model.arch: unet_inception}}``. Data, preprocessing and inference are
    the run's: the candidates of one ensemble must read the same inputs."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    set: dict[str, Any] = Field(default_factory=dict)

    @field_validator("set")
    @classmethod
    def _model_or_train(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in value if not (k.startswith("model.") or k.startswith("train."))]
        if bad:
            raise ValueError(f"candidate settings must be model.* or train.* keys (the candidates share data, "
                             f"preprocessing and inference), got {bad}")
        return value


class CrossValidationConfig(StrictModel):
    """k-fold cross-validation: ``medseg train --fold K`` and the pipeline stage ``cv``.

    The pool is every labelled manifest row whose split is not ``test`` (``train``, ``val`` or
    empty); its **patients** are shuffled with ``seed`` and dealt round-robin into ``folds``
    folds (:mod:`medseg.auto.folds`), so a patient's cases are always in one fold. Fold k trains on
    the other folds and predicts fold k: every pool patient is predicted exactly once by a
    model that never saw it (out-of-fold). The weights kept per fold are the last epoch's
    (with ``train.ema_decay``, their average), never the best validation epoch's: choosing the
    epoch on the held-out fold would make its score optimistic. For the same reason
    ``train.patience`` does not apply in a fold.

    ``repeats``: models trained per fold, repeat r with ``train.seed + r`` (folders ``fold_<k>``,
    ``fold_<k>_r<r>``); the fold's patients are predicted by the average of its repeats'
    probabilities, so the out-of-fold scores are those of an ensemble of ``repeats`` models,
    and the model folder holds ``folds x repeats`` models. Costs ``repeats`` times the training
    and the inference. Two models averaged on BraTS: +0.005 to +0.010 mean Dice out-of-fold
    over the two models' mean, 9-11 of 12 patients better, in two pairs of runs
    (docs/benchmarks.md, "A second training seed ... averaging seeds").

    ``candidates`` (nnU-Net's "find best configuration"; :mod:`medseg.auto.candidates`): two or more
    configurations, each cross-validated on the same folds at the same budget; the best single
    one, or the best pair averaged (``ensemble_pairs``) when it gains more than
    ``selection_min_gain`` mean out-of-fold Dice, is shipped. ``try_tta``: also predict the
    chosen one's out-of-fold cases with in-plane mirroring (``inference.tta``) and keep it
    under the same rule. Empty (default): the run's config is the one model.
    """

    folds: int = Field(default=5, ge=2, le=50)
    seed: int = 0
    repeats: int = Field(default=1, ge=1, le=10)
    postprocess: PostprocessSearchConfig = Field(default_factory=PostprocessSearchConfig)
    candidates: list[CandidateConfig] = Field(default_factory=list)
    ensemble_pairs: bool = True
    try_tta: bool = False
    selection_min_gain: float = Field(default=0.002, ge=0.0)

    @field_validator("candidates")
    @classmethod
    def _distinct_names(cls, value: list[CandidateConfig]) -> list[CandidateConfig]:
        names = [c.name for c in value]
        if len(set(names)) != len(names):
            raise ValueError(f"candidate names must be distinct, got {names}")
        if len(value) == 1:
            raise ValueError("give two or more candidates (one candidate is the run's own config: leave the list empty)")
        return value


class Config(StrictModel):
    """The whole configuration. Sections are added by the stages that use them."""

    data: DataConfig = Field(default_factory=DataConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cv: CrossValidationConfig = Field(default_factory=CrossValidationConfig)
    pacs: PacsConfig = Field(default_factory=PacsConfig)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted`` ``a.b.c`` (in place), creating the sections on
    the way: how every ``--set`` override reaches a settings tree (:func:`load_config`,
    ``medseg.inference.bundle.inference_patch``, candidates' ``set``). Raises ``ConfigError`` when
    a key on the way holds a value, not a section."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value``; the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.strip(), value


def format_validation_error(source: str, exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per problem: ``source: field.path: message``. An unknown key lists the valid
    keys of its section, closest first: ``model.widht: unknown key; valid keys of model: width,
    ...``. ``model``: the class that was validated (default: the :class:`StrictModel` subclass
    named by the error's title)."""
    root = model or _model_named(exc.title)
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = unknown_key_message(root, err["loc"])
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def unknown_key_message(root: type[BaseModel] | None, loc: tuple[int | str, ...]) -> str:
    """``unknown key; valid keys of <section>: ...`` (closest to the key first, by difflib), for
    the unknown key at ``loc`` of a ``root`` config; a plain "unknown key" when the section
    cannot be found."""
    section = _section_model(root, loc[:-1]) if root is not None else None
    if section is None:
        return "unknown key (check the spelling)"
    key = str(loc[-1])
    valid = list(section.model_fields)
    closest = difflib.get_close_matches(key, valid, n=len(valid), cutoff=0.0)
    where = f" of {'.'.join(str(p) for p in loc[:-1])}" if len(loc) > 1 else ""
    return f"unknown key; valid keys{where}: {', '.join(closest)}"


def _model_named(title: str) -> type[BaseModel] | None:
    """The :class:`StrictModel` subclass called ``title`` (a ``ValidationError``'s title), if one."""
    pending: list[type] = [StrictModel]
    while pending:
        cls = pending.pop()
        if cls.__name__ == title:
            return cls  # type: ignore[return-value]
        pending.extend(cls.__subclasses__())
    return None


def _section_model(root: type[BaseModel], path: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The pydantic model of the section at ``path`` below ``root`` (through optional fields,
    dict values and list items), or None."""
    from typing import Union, get_args, get_origin

    def unwrap(annotation: Any) -> Any:
        while get_origin(annotation) in (Union, Annotated) or type(annotation).__name__ == "UnionType":
            args = [a for a in get_args(annotation) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)] or [
                a for a in args if get_origin(a) in (dict, list)]
            annotation = (models or args)[0]
        return annotation

    current: Any = root
    for key in path:
        current = unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(key))
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) in (dict, list):
            current = get_args(current)[-1]
        else:
            return None
    current = unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    model: type[StrictModel] = Config,
) -> Any:
    """Read a YAML config (or defaults when ``path`` is None), apply ``key=value`` overrides.

    Raises ``ConfigError`` naming the file and field for every problem.
    """
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        loaded = read_user_yaml(path, ConfigError, missing="config file not found")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections")
        tree = loaded
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc, model)) from None


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Save the resolved config as YAML (written next to every run's outputs)."""
    from medseg.atomic import write_text

    write_text(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
