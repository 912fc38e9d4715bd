"""The planning rules: a dataset fingerprint -> a full medseg config (no file access).

Like nnU-Net's experiment planner (one ``determine_*`` function per decision), for medseg's
2D/2.5D models: each ``determine_*`` below decides one setting from the fingerprint
(:mod:`medseg.auto.fingerprint`) and returns it with its rule line (the line written into the plan);
:func:`plan_from_fingerprint` composes them into a validated :class:`medseg.config.Config`.
:func:`medseg.auto.planning.plan_dataset` fingerprints a manifest, runs these rules and writes the
plan; the training speed the epochs rest on is measured by :mod:`medseg.auto.plan_speed`.

Axes are RAS ``(R, A, S)``: R = sagittal slices, A = coronal, S = axial. "Round" below means
round half up.

Rules and their constants
-------------------------
================================  ===========================================================
setting                           rule (constants in capitals: below, or in plan_speed)
================================  ===========================================================
data.labels                       foreground ``nonzero``; ``allowed_values`` = the sorted union
                                  of the raw label values seen
preprocess.slice_axis             the axis of the largest median spacing if it is more than
(= stats.axis,                    ``ANISOTROPY_RATIO`` (1.5) x the smallest, else axial
evaluation.slice_axis)
preprocess.spacing_inplane        ``null`` (native grid) when every case's in-plane spacings lie
                                  within ``SPACING_TOLERANCE`` (10%) of the dataset medians,
                                  else the two median in-plane spacings
preprocess.context_slices k       round(``CONTEXT_MM`` (2 mm) / median slice spacing), clamped
                                  to [``MIN_CONTEXT``, ``MAX_CONTEXT``] = [1, 3]
model                             ``MODEL_RECIPE``: deeplabv3plus, resnet18, width 0.5 (chosen
                                  by 5-fold CV on the 12 BraTS patients at the same CPU budget
                                  against the hand-tuned unet_inception: docs/benchmarks.md);
                                  in_channels = channels x (2k + 1)
train.patch_size                  median in-plane size of the cropped training slice: the
                                  foreground box (fingerprint ``cropped_extent``, resampled
                                  in-plane if planned) plus 2 x ``preprocess.crop_margin``
                                  (8 px; at most the slice), each side rounded to the
                                  nearest multiple of ``PATCH_MULTIPLE`` (32), clamped to
                                  ``PATCH_RANGE`` ([64, 512]; CPU [64, 256])
preprocess.ct_window (CT)         0.5 / 99.5 percentiles of the first channel inside the
                                  lesions (pooled over cases; nnU-Net's foreground clipping),
                                  widened about its centre to at least ``CT_MIN_WINDOW_HU``
                                  (100 HU); MR keeps the z-score on [0.5, 99.5] percentiles
train.batch_size                  CPU ``BATCH_CPU`` (8: a CPU step costs the same per slice
                                  at 8 as at 16, so a short budget gets twice the optimiser
                                  steps); CUDA ``BATCH_CUDA`` (32) x
                                  ``REFERENCE_PATCH`` area / patch area, rounded to a power of
                                  two, clamped to ``BATCH_CUDA_RANGE`` ([4, 64])
train.epochs                      floor(minutes per fold x 60 x throughput /
                                  ``SAMPLES_PER_EPOCH`` (1600)), clamped to ``EPOCH_RANGE``
                                  ([3, 100]); throughput = training slices/s of the planned
                                  model, patch and batch measured on the planning machine
                                  (:mod:`medseg.engine.throughput`, when it plans for its own
                                  device), else assumed: ``THROUGHPUT_CPU`` (25 slices/s,
                                  CPUs with bf16 instructions) or ``THROUGHPUT_CPU_FP32`` (8,
                                  other CPUs: fp32 training) or ``THROUGHPUT_CUDA`` (600) at a
                                  160 x 192 patch, scaled by
                                  the area ratio; minutes per fold default
                                  ``DEFAULT_MINUTES`` (CPU 20, CUDA 10); ``max_minutes`` =
                                  ``MAX_MINUTES_FACTOR`` (1.25) x minutes per fold. On a CPU
                                  the measurement is whole training steps through the data
                                  pipeline on ``MEASURE_CASES`` (3) pool cases, once with 1
                                  thread and once with every core (the loader worker shares
                                  them); on a GPU, the optimiser step alone
train.threads (CPU)               every core (``null``) when that measured
                                  ``ALL_CORES_GAIN`` (1.1) x the 1-thread speed or more, else 1
                                  (also 1 when not measured: kind to a shared machine)
train (the rest)                  ``TRAIN_RECIPE`` (configs/brats_unet_inception.yaml) plus
                                  ``WORKERS`` per device
train.augment                     ``STRONG_AUGMENT`` when the pool has fewer than
                                  ``STRONG_AUGMENT_BELOW`` (50) patients, else the defaults
inference.min_lesion_mm3          half the 5th percentile of the lesion volumes, rounded to one
                                  significant digit, clamped to ``MIN_LESION_RANGE``
                                  ([10, 500] mm^3); the CV stage refines it
inference.threshold               ``THRESHOLD`` (0.5)
cv.folds                          ``FOLDS`` (5), or the number of pool patients if fewer; fewer
                                  than 2 patients is an error
cv.repeats                        models (seeds) per fold, averaged: the epochs the budget
                                  holds // ``EPOCH_RANGE``'s maximum, clamped to [1,
                                  ``MAX_REPEATS``] (3): a budget beyond one model's 100 epochs
                                  buys a seed ensemble instead of idle time (two averaged
                                  models: +0.005 to +0.010 Dice out-of-fold on BraTS,
                                  docs/benchmarks.md)
cv.candidates, cv.try_tta         ``PLAN_CANDIDATES`` (the recipe's DeepLabv3+ and the U-Net
                                  with inception skips) and mirroring tried, when the budget
                                  holds one full model of each per fold (a GPU); else none
cv.postprocess.objective          ``both`` (lesion F1 within a margin of the best, then Dice)
                                  when the median pool case holds ``MULTI_LESION_CASES`` (2) or
                                  more lesions of at least ``inference.min_lesion_mm3``; else
                                  ``dice``
================================  ===========================================================
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import yaml
from pydantic import ValidationError

from medseg.config import Config, LabelConfig, PreprocessConfig, format_validation_error
from medseg.errors import ConfigError

T = TypeVar("T")

ANISOTROPY_RATIO = 1.5
SPACING_TOLERANCE = 0.10
CONTEXT_MM = 2.0
MIN_CONTEXT, MAX_CONTEXT = 1, 3
PATCH_MULTIPLE = 32
PATCH_RANGE = {"cpu": (64, 256), "cuda": (64, 512)}
CT_MIN_WINDOW_HU = 100.0
CT_WINDOW_PERCENTILES = ("p0.5", "p99.5")
REFERENCE_PATCH = (160, 192)
BATCH_CPU = 8  # slices/s on 2 AVX2 cores at 160 x 192: 9.0 at 8, 8.8 at 16 (benchmarks/bench_training.py)
BATCH_CUDA = 32
BATCH_CUDA_RANGE = (4, 64)
SAMPLES_PER_EPOCH = 1600
# Training slices / s at REFERENCE_PATCH with MODEL_RECIPE when the plan does not measure: the
# unet_inception figures measured on shared 2-core machines (17 bf16, 5.5 fp32) x 1.5, the
# deeplabv3plus / unet_inception ratio of the step measured on one machine (13.0 / 8.7, fp32).
THROUGHPUT_CPU = 25.0  # bf16 (AVX-512 BF16 / AMX CPU)
THROUGHPUT_CPU_FP32 = 8.0  # a CPU without bf16 instructions (AVX2 only: fp32 steps)
THROUGHPUT_CUDA = 600.0
EPOCH_RANGE = (3, 100)
DEFAULT_MINUTES = {"cpu": 20.0, "cuda": 10.0}
MAX_MINUTES_FACTOR = 1.25
MULTI_LESION_CASES = 2  # median lesions per case from which post-processing is chosen on lesion F1 too
STRONG_AUGMENT_BELOW = 50
MIN_LESION_RANGE = (10.0, 500.0)
THRESHOLD = 0.5
FOLDS = 5
MAX_REPEATS = 3
# cv.candidates proposed when the budget holds one full model (EPOCH_RANGE[1] epochs) of each
PLAN_CANDIDATES: list[dict[str, Any]] = [
    {"name": "deeplabv3plus", "set": {}},
    {"name": "unet_inception", "set": {"model.arch": "unet_inception"}},
]

AXIS_NAMES = ("sagittal", "coronal", "axial")  # RAS index -> slice axis name
AXIS_LETTERS = "RAS"

MODEL_RECIPE: dict[str, Any] = {
    "arch": "deeplabv3plus",
    "encoder": "resnet18",
    "width": 0.5,
    "dropout": 0.1,
    "out_channels": 1,
}
TRAIN_RECIPE: dict[str, Any] = {
    "seed": 0,
    "samples_per_epoch": SAMPLES_PER_EPOCH,
    "lesion_fraction": 0.5,
    "amp": "auto",
    "patience": None,
    "ema_decay": 0.995,
    "cache_dir": None,
    "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
    "schedule": {"name": "poly", "warmup_epochs": 1},
    "loss": {"dice_weight": 1.0, "ce_weight": 1.0, "batch_dice": True},
}
WORKERS = {"cpu": {"num_workers": 1, "threads": 1}, "cuda": {"num_workers": 8, "threads": None}}
STRONG_AUGMENT: dict[str, Any] = {
    "affine_prob": 0.6,
    "rotate_deg": 30.0,
    "scale": 0.25,
    "elastic_prob": 0.3,
    "intensity_prob": 0.5,
    "intensity_scale": 0.2,
    "intensity_shift": 0.3,
    "blur_prob": 0.15,
    "translate": 0.25,
}


@dataclass(frozen=True)
class MeasuredSpeed:
    """Training speed measured on the planning machine: ``slices_per_s`` of the planned model,
    ``what`` was timed (for the rule line) and the ``threads`` (``train.threads``) it was
    measured with, ``why_threads`` the comparison that chose them ("" when not compared)."""

    slices_per_s: float
    what: str
    threads: int | None
    why_threads: str = ""


@dataclass
class Plan:
    """A planned config, the reason for each decision (one line each) and the fingerprint."""

    config: Config
    rules: list[str]
    fingerprint: dict[str, Any]


def round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def four_digits(value: float) -> str:
    """A number in a rule line: four significant digits (``0.7``, ``1.333``, ``1600``)."""
    return f"{value:.4g}"


def round_patch(extent: list[float], device: str) -> list[int]:
    """Each in-plane side rounded to the nearest multiple of ``PATCH_MULTIPLE`` and clamped to
    ``PATCH_RANGE[device]``: 100 x 150 -> [96, 160]."""
    lo, hi = PATCH_RANGE[device]
    return [min(max(round_half_up(e / PATCH_MULTIPLE) * PATCH_MULTIPLE, lo), hi) for e in extent]


def power_of_two(value: float) -> int:
    return 2 ** round_half_up(math.log2(value))


def one_significant_digit(value: float) -> float:
    if value <= 0:
        return 0.0
    digits = -int(math.floor(math.log10(value)))
    return float(round(value, digits))


def in_plane_axes(axis: int) -> list[int]:
    """The two RAS indices of the slice plane normal to RAS axis ``axis``, in order."""
    return [i for i in range(3) if i != axis]


def plane_letters(axis: int) -> str:
    """The slice plane normal to ``axis`` in RAS letters: axial -> ``RxA``."""
    return "x".join(AXIS_LETTERS[i] for i in in_plane_axes(axis))


def area_ratio(patch: list[int]) -> float:
    """``REFERENCE_PATCH`` area / ``patch`` area."""
    return REFERENCE_PATCH[0] * REFERENCE_PATCH[1] / (patch[0] * patch[1])


def epochs_in_budget(minutes: float, slices_per_s: float) -> int:
    """Whole epochs of ``SAMPLES_PER_EPOCH`` slices that ``minutes`` of training at ``slices_per_s`` hold."""
    return math.floor(minutes * 60 * slices_per_s / SAMPLES_PER_EPOCH)


# --------------------------------------------------------------------------- one function per decision
# Each returns (value, rule line); the rule lines go into the plan in the order plan_from_fingerprint takes them.


def determine_labels(fingerprint: dict[str, Any], labels: LabelConfig | None) -> tuple[dict[str, Any], str]:
    """``data.labels``: ``labels``' foreground (default ``nonzero``) and its ``allowed_values``
    when set, else the sorted raw label values the fingerprint saw."""
    foreground = labels.foreground if labels is not None else "nonzero"
    allowed = (labels.allowed_values if labels is not None and labels.allowed_values is not None
               else sorted(int(v) for v in fingerprint["label_values"]))
    return {"foreground": foreground, "allowed_values": allowed}, (
        f"data.labels.foreground = {foreground}; allowed_values = {allowed}: label values seen in "
        f"{fingerprint['n_cases']} pool case(s)")


def determine_slice_axis(spacing: list[float]) -> tuple[int, str]:
    """RAS index of the slice axis (``preprocess.slice_axis``, ``stats.axis``,
    ``evaluation.slice_axis``) for median spacings ``(R, A, S)`` mm."""
    largest, smallest = max(spacing), min(spacing)
    mm = " x ".join(f"{AXIS_LETTERS[i]} {four_digits(s)}" for i, s in enumerate(spacing))
    if largest > ANISOTROPY_RATIO * smallest:
        # ties: prefer axial, then coronal, then sagittal
        axis = next(i for i in (2, 1, 0) if spacing[i] == largest)
        why = (f"median spacing {mm} mm: {AXIS_LETTERS[axis]} is {four_digits(largest / smallest)}x the finest "
               f"(> {ANISOTROPY_RATIO}x), slice across it")
    else:
        axis, why = 2, f"median spacing {mm} mm is within {ANISOTROPY_RATIO}x of isotropic: axial"
    return axis, f"preprocess.slice_axis = {AXIS_NAMES[axis]} (and stats.axis, evaluation.slice_axis): {why}"


def determine_spacing_inplane(
    cases: list[dict[str, Any]], spacing: list[float], axis: int
) -> tuple[list[float] | None, str]:
    """``preprocess.spacing_inplane``: ``None`` (native grid) when every case's in-plane spacings
    lie within ``SPACING_TOLERANCE`` of the medians ``spacing`` (RAS), else the two medians."""
    inplane = in_plane_axes(axis)
    median_inplane = [spacing[i] for i in inplane]
    off = [
        (row["case_id"], [row["spacing"][i] for i in inplane])
        for row in cases
        if any(abs(row["spacing"][i] - m) > SPACING_TOLERANCE * m for i, m in zip(inplane, median_inplane, strict=True))
    ]
    plane = plane_letters(axis)
    if not off:
        return None, (f"preprocess.spacing_inplane = null (native grid): every case's {plane} spacing lies within "
                      f"{SPACING_TOLERANCE:.0%} of the median {four_digits(median_inplane[0])} x "
                      f"{four_digits(median_inplane[1])} mm")
    spacing_inplane = [round(s, 4) for s in median_inplane]
    example = ", ".join(f"{cid} {' x '.join(four_digits(s) for s in sp)}" for cid, sp in off[:3])
    return spacing_inplane, (f"preprocess.spacing_inplane = {spacing_inplane}: {len(off)} case(s) lie more than "
                             f"{SPACING_TOLERANCE:.0%} from the median {plane} spacing (e.g. {example} mm); resample "
                             "to the median")


def determine_context_slices(slice_spacing: float) -> tuple[int, str]:
    """``preprocess.context_slices`` k from the median spacing along the slice axis (mm)."""
    k = min(max(round_half_up(CONTEXT_MM / slice_spacing), MIN_CONTEXT), MAX_CONTEXT)
    return k, (f"preprocess.context_slices = {k}: {four_digits(CONTEXT_MM)} mm of context / median slice spacing "
               f"{four_digits(slice_spacing)} mm, rounded, clamped to [{MIN_CONTEXT}, {MAX_CONTEXT}]")


def determine_model(channels: list[str], k: int) -> tuple[dict[str, Any], str]:
    """``model``: ``MODEL_RECIPE`` reading every channel over ``2k + 1`` slices."""
    in_channels = len(channels) * (2 * k + 1)
    return {**MODEL_RECIPE, "in_channels": in_channels}, (
        f"model.in_channels = {in_channels}: {len(channels)} channel(s) {channels} x {2 * k + 1} slices; "
        f"model = {MODEL_RECIPE['arch']} / {MODEL_RECIPE['encoder']}, width {MODEL_RECIPE['width']} "
        f"(recipe, chosen by cross-validation: docs/benchmarks.md)")


def determine_patch_size(cases: list[dict[str, Any]], axis: int, target: list[float] | None,
                         device: Literal["cpu", "cuda"]) -> tuple[list[int], str]:
    """``train.patch_size``: the median in-plane size of the cropped training slice (the
    foreground box plus the preprocessing crop margin, resampled to ``target`` in-plane
    spacing when planned), rounded by :func:`round_patch`."""
    inplane = in_plane_axes(axis)
    margin = PreprocessConfig().crop_margin
    extents = []
    for row in cases:
        ext = [float(row["cropped_extent"][i]) for i in inplane]
        size = [float(row["shape"][i]) for i in inplane]
        if target is not None:
            scale = [row["spacing"][i] / t for i, t in zip(inplane, target, strict=True)]
            ext = [e * f for e, f in zip(ext, scale, strict=True)]
            size = [n * f for n, f in zip(size, scale, strict=True)]
        extents.append([min(e + 2 * margin, n) for e, n in zip(ext, size, strict=True)])
    median_extent = [statistics.median(e[j] for e in extents) for j in range(2)]
    patch = round_patch(median_extent, device)
    lo, hi = PATCH_RANGE[device]
    return patch, (f"train.patch_size = {patch}: median cropped {plane_letters(axis)} slice "
                   f"{four_digits(median_extent[0])} x {four_digits(median_extent[1])} px (foreground box + 2 x "
                   f"{margin} px crop margin{', after resampling' if target is not None else ''}), to the nearest "
                   f"multiple of {PATCH_MULTIPLE}, clamped to [{lo}, {hi}] ({device})")


def determine_normalisation(fingerprint: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The intensity settings of ``preprocess`` that the data decide: CT ``{"ct_window": [low,
    high]}`` from the first channel's lesion percentiles (``{}`` without lesion voxels: the
    default window); MR ``{}`` (the default percentile z-score)."""
    if str(fingerprint["modality"]).upper() != "CT":
        return {}, ("preprocess.mr_percentiles = [0.5, 99.5] (default): MR channels are clipped to their foreground "
                    "percentiles and z-scored")
    first = list(fingerprint["channels"])[0]
    lesion = (fingerprint.get("intensity", {}).get(first) or {}).get("lesion")
    if lesion is None:
        return {}, "preprocess.ct_window = default: no lesion voxels in the pool to measure it on"
    low, high = (float(lesion[p]) for p in CT_WINDOW_PERCENTILES)
    measured = f"[{four_digits(low)}, {four_digits(high)}]"
    if high - low < CT_MIN_WINDOW_HU:
        centre = (low + high) / 2
        low, high = centre - CT_MIN_WINDOW_HU / 2, centre + CT_MIN_WINDOW_HU / 2
    window = [round(low, 1), round(high, 1)]
    return {"ct_window": window}, (f"preprocess.ct_window = {window}: 0.5-99.5 percentiles of {first} inside the "
                                   f"lesions {measured} HU, widened to at least {four_digits(CT_MIN_WINDOW_HU)} HU")


def determine_batch_size(patch: list[int], device: Literal["cpu", "cuda"]) -> tuple[int, str]:
    """``train.batch_size``: ``BATCH_CPU`` on a CPU; on a GPU ``BATCH_CUDA`` scaled by the
    patch area to a power of two in ``BATCH_CUDA_RANGE``."""
    if device == "cpu":
        return BATCH_CPU, f"train.batch_size = {BATCH_CPU}: CPU"
    ratio = area_ratio(patch)
    batch = min(max(power_of_two(BATCH_CUDA * ratio), BATCH_CUDA_RANGE[0]), BATCH_CUDA_RANGE[1])
    return batch, (f"train.batch_size = {batch}: {BATCH_CUDA} at {REFERENCE_PATCH[0]}x{REFERENCE_PATCH[1]} x "
                   f"area ratio {ratio:.3g}, to a power of two in {list(BATCH_CUDA_RANGE)}")


def training_speed(throughput: float | MeasuredSpeed | None, patch: list[int], batch: int,
                   device: Literal["cpu", "cuda"], cpu_bf16: bool | None) -> tuple[float, str, int | None, str]:
    """The training slices/s the epochs rest on: (slices/s, how it was obtained, ``train.threads``,
    why those threads). ``throughput``: as :func:`plan_from_fingerprint` takes it; ``None``: the
    device's assumed constant scaled by the patch area (``cpu_bf16`` ``None``: this machine's CPU)."""
    threads = WORKERS[device]["threads"]
    if isinstance(throughput, (int, float)):
        throughput = MeasuredSpeed(float(throughput), f"{batch} x {patch[0]}x{patch[1]} steps of the planned model",
                                   threads)
    if throughput is not None:
        if not throughput.slices_per_s > 0:
            raise ConfigError(f"measured training throughput must be positive, got {throughput.slices_per_s}")
        return (throughput.slices_per_s, f"measured on this machine: {throughput.what}", throughput.threads,
                throughput.why_threads)
    if device == "cuda":
        return THROUGHPUT_CUDA * area_ratio(patch), "assumed, cuda", threads, ""
    if cpu_bf16 is None:
        from medseg.runtime import cpu_has_fast_bf16

        cpu_bf16 = cpu_has_fast_bf16()
    kind = "assumed, cpu, bf16" if cpu_bf16 else "assumed, cpu without bf16 instructions, fp32"
    return (THROUGHPUT_CPU if cpu_bf16 else THROUGHPUT_CPU_FP32) * area_ratio(patch), kind, threads, ""


def determine_epochs(minutes: float, slices_per_s: float, kind: str) -> tuple[tuple[int, float], str]:
    """(``train.epochs``, ``train.max_minutes``) for ``minutes`` per fold at ``slices_per_s``
    (``kind``: how that speed was obtained, for the rule line)."""
    epochs = min(max(epochs_in_budget(minutes, slices_per_s), EPOCH_RANGE[0]), EPOCH_RANGE[1])
    max_minutes = MAX_MINUTES_FACTOR * minutes
    return (epochs, max_minutes), (
        f"train.epochs = {epochs}: {four_digits(minutes)} min/fold x {four_digits(slices_per_s)} slices/s ({kind}) / "
        f"{SAMPLES_PER_EPOCH} slices per epoch, clamped to {list(EPOCH_RANGE)}; "
        f"max_minutes = {four_digits(max_minutes)} ({MAX_MINUTES_FACTOR} x budget)")


def determine_workers(
    device: Literal["cpu", "cuda"], threads: int | None, why_threads: str
) -> tuple[dict[str, Any], str]:
    """``train.num_workers`` (``WORKERS``) and ``train.threads`` (measured, or ``WORKERS``')."""
    return {**WORKERS[device], "threads": threads}, (
        f"train.device = {device}; num_workers = {WORKERS[device]['num_workers']}, "
        f"threads = {threads or 'null'}{why_threads}; optimiser, schedule, loss, EMA: the BraTS recipe")


def determine_augment(n_patients: int) -> tuple[dict[str, Any] | None, str]:
    """``train.augment``: ``STRONG_AUGMENT`` below ``STRONG_AUGMENT_BELOW`` patients, else ``None`` (the defaults)."""
    if n_patients < STRONG_AUGMENT_BELOW:
        return dict(STRONG_AUGMENT), (f"train.augment = strong (rotate 30 deg, scale 0.25, elastic 0.3, ...): "
                                      f"{n_patients} patients < {STRONG_AUGMENT_BELOW} over-fit fast")
    return None, f"train.augment = defaults: {n_patients} patients >= {STRONG_AUGMENT_BELOW}"


def determine_min_lesion(fingerprint: dict[str, Any]) -> tuple[float, str]:
    """``inference.min_lesion_mm3``: half the 5th percentile of the pool's lesion volumes."""
    volumes = fingerprint.get("lesion_volume_mm3")
    lo_mm3, hi_mm3 = MIN_LESION_RANGE
    if volumes is None:
        return lo_mm3, f"inference.min_lesion_mm3 = {four_digits(lo_mm3)}: no lesions in the pool, the lower bound"
    p5 = float(volumes["p5"])
    min_lesion = min(max(one_significant_digit(p5 / 2), lo_mm3), hi_mm3)
    return min_lesion, (f"inference.min_lesion_mm3 = {four_digits(min_lesion)}: half the 5th percentile "
                        f"{four_digits(p5)} mm3 of {fingerprint['n_lesions']} lesion volumes, 1 significant digit, "
                        f"clamped to [{four_digits(lo_mm3)}, {four_digits(hi_mm3)}] (the CV stage refines it)")


def determine_postprocess_objective(fingerprint: dict[str, Any], min_lesion_mm3: float) -> tuple[str, str]:
    """``cv.postprocess.objective`` from the pool's lesions per case: ``both`` (lesion F1 first,
    then Dice) when the median case holds :data:`MULTI_LESION_CASES` or more lesions of at least
    ``min_lesion_mm3`` (metastases, MS plaques: a rule that wins Dice by dropping small components
    deletes lesions), else ``dice`` (one lesion per case, e.g. a glioma and its 1-voxel specks)."""
    counts = [sum(v >= min_lesion_mm3 for v in case.get("lesion_volumes_mm3", ()))
              for case in fingerprint.get("cases", ())]
    if not counts:
        objective, why = "dice", "no labelled case in the pool"
    else:
        median = float(statistics.median(counts))
        how = (f"median {four_digits(median)} lesion(s) >= {four_digits(min_lesion_mm3)} mm3 per case over "
               f"{len(counts)} case(s)")
        if median >= MULTI_LESION_CASES:
            objective, why = "both", (f"{how} (>= {MULTI_LESION_CASES}: several lesions per case): the best Dice among "
                                      "the rules within cv.postprocess.lesion_f1_margin of the best lesion F1")
        else:
            objective, why = "dice", f"{how} (< {MULTI_LESION_CASES}): one lesion per case, rules ranked by Dice"
    return objective, f"cv.postprocess.objective = {objective}: {why}"


def determine_folds(n_patients: int) -> tuple[int, str]:
    """``cv.folds``: ``FOLDS``, or the number of pool patients if fewer."""
    folds = min(FOLDS, n_patients)
    return folds, f"cv.folds = {folds}: {n_patients} patients in the pool (at most {FOLDS})"


def determine_candidates(budget_epochs: int) -> tuple[list[dict[str, Any]], str]:
    """``cv.candidates`` (and ``cv.try_tta`` when any): ``PLAN_CANDIDATES`` when ``budget_epochs``
    per fold hold a full model (``EPOCH_RANGE``'s maximum) of each, else none."""
    if budget_epochs >= len(PLAN_CANDIDATES) * EPOCH_RANGE[1]:
        return [dict(c) for c in PLAN_CANDIDATES], (
            f"cv.candidates = {[c['name'] for c in PLAN_CANDIDATES]}, try_tta: the budget holds {budget_epochs} "
            f"epochs per fold, >= {len(PLAN_CANDIDATES)} x {EPOCH_RANGE[1]}: each cross-validated, the best single "
            "one or pair and mirroring chosen on the out-of-fold predictions")
    return [], (f"cv.candidates = none: the budget holds {budget_epochs} epochs per fold, under "
                f"{len(PLAN_CANDIDATES)} x {EPOCH_RANGE[1]} (one full model per candidate): the recipe's network only")


def determine_repeats(budget_epochs: int, n_candidates: int) -> tuple[int, str]:
    """``cv.repeats``: the models (seeds) per fold and candidate that ``budget_epochs`` per fold
    hold, clamped to [1, ``MAX_REPEATS``]."""
    models_per_fold = max(n_candidates, 1)
    repeats = min(max(budget_epochs // (EPOCH_RANGE[1] * models_per_fold), 1), MAX_REPEATS)
    return repeats, (f"cv.repeats = {repeats}: the budget holds {budget_epochs} epochs per fold, one model trains at "
                     f"most {EPOCH_RANGE[1]}; {budget_epochs} // ({EPOCH_RANGE[1]} x {models_per_fold} candidate(s)) "
                     f"models (seeds) per fold, averaged, clamped to [1, {MAX_REPEATS}]")


# --------------------------------------------------------------------------- the plan


def _noted(rules: list[str], decision: tuple[T, str]) -> T:
    """The value of a ``determine_*`` decision; its rule line is appended to ``rules``."""
    value, rule = decision
    rules.append(rule)
    return value


def plan_from_fingerprint(
    fingerprint: dict,
    manifest: str,
    device: Literal["cpu", "cuda"] = "cpu",
    minutes_per_fold: float | None = None,
    labels: LabelConfig | None = None,
    cpu_bf16: bool | None = None,
    throughput: float | MeasuredSpeed | None = None,
) -> Plan:
    """Apply the rules of the module docstring to ``fingerprint`` (``medseg.auto.fingerprint``).

    ``labels``: the label mapping to keep (its ``foreground``, and its ``allowed_values`` when
    set); default ``nonzero`` with the values seen. ``cpu_bf16``: whether the CPU that will
    train computes bf16 in hardware (``None``: this machine's, :func:`medseg.runtime.cpu_has_fast_bf16`).
    ``throughput``: training slices/s measured at the planned model, patch and batch
    (:func:`medseg.engine.throughput.measure_training_throughput`, a float: the step alone at
    the device's ``WORKERS`` threads) or a :class:`MeasuredSpeed` (which also sets
    ``train.threads``); ``None``: the assumed constants (then ``cpu_bf16`` picks the CPU one).
    Raises ``ConfigError`` for an unknown device, a non-positive time budget or throughput, or
    a pool of fewer than 2 patients.
    """
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"plan device must be cpu or cuda (resolve 'auto' first), got {device!r}")
    minutes = DEFAULT_MINUTES[device] if minutes_per_fold is None else float(minutes_per_fold)
    if not minutes > 0:
        raise ConfigError(f"minutes per fold must be positive, got {minutes_per_fold}")
    n_patients = int(fingerprint["n_patients"])
    if n_patients < 2:
        raise ConfigError(
            f"{manifest}: the cross-validation pool (labelled cases outside the test split) has "
            f"{n_patients} patient(s); planning needs at least 2 for cross-validation"
        )
    cases = fingerprint["cases"]
    spacing = [float(s) for s in fingerprint["spacing_median"]]
    rules: list[str] = []

    data_labels = _noted(rules, determine_labels(fingerprint, labels))
    axis = _noted(rules, determine_slice_axis(spacing))
    spacing_inplane = _noted(rules, determine_spacing_inplane(cases, spacing, axis))
    k = _noted(rules, determine_context_slices(spacing[axis]))
    model = _noted(rules, determine_model(list(fingerprint["channels"]), k))
    patch = _noted(rules, determine_patch_size(cases, axis, spacing_inplane, device))
    normalisation = _noted(rules, determine_normalisation(fingerprint))
    batch = _noted(rules, determine_batch_size(patch, device))
    slices_per_s, kind, threads, why_threads = training_speed(throughput, patch, batch, device, cpu_bf16)
    epochs, max_minutes = _noted(rules, determine_epochs(minutes, slices_per_s, kind))
    workers = _noted(rules, determine_workers(device, threads, why_threads))
    augment = _noted(rules, determine_augment(n_patients))
    min_lesion = _noted(rules, determine_min_lesion(fingerprint))
    rules.append(f"inference.threshold = {THRESHOLD}")
    objective = _noted(rules, determine_postprocess_objective(fingerprint, min_lesion))
    folds = _noted(rules, determine_folds(n_patients))
    budget_epochs = epochs_in_budget(minutes, slices_per_s)
    candidates = _noted(rules, determine_candidates(budget_epochs))
    repeats = _noted(rules, determine_repeats(budget_epochs, len(candidates)))

    axis_name = AXIS_NAMES[axis]
    train: dict[str, Any] = {**TRAIN_RECIPE, **workers, "device": device, "epochs": epochs, "batch_size": batch,
                             "patch_size": patch, "max_minutes": max_minutes}  # fmt: skip
    if augment is not None:
        train["augment"] = augment
    tree = {
        "data": {"manifest": str(manifest), "labels": data_labels},
        "stats": {"axis": axis_name},
        "preprocess": {"slice_axis": axis_name, "context_slices": k, "spacing_inplane": spacing_inplane,
                       **normalisation},
        "model": model,
        "evaluation": {"slice_axis": axis_name},
        "inference": {"threshold": THRESHOLD, "min_lesion_mm3": min_lesion},
        "train": train,
        "cv": {"folds": folds, "repeats": repeats, "postprocess": {"objective": objective},
               "candidates": candidates, "try_tta": bool(candidates)},
    }
    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:  # a rule produced an invalid value: a bug, reported in full
        raise ConfigError(format_validation_error(f"plan for {manifest}", exc)) from None
    return Plan(config=config, rules=rules, fingerprint=fingerprint)


def plan_yaml(plan: Plan, header: str = "") -> str:
    """The config as YAML (the form of ``medseg.config.dump_config``) under a comment header
    listing the rules."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    lines += ["# Planned by `medseg plan` (medseg/auto/planning.py); one line per decision:"]
    lines += [f"#   {rule}" for rule in plan.rules]
    body = yaml.safe_dump(plan.config.model_dump(mode="json"), sort_keys=False)
    return "\n".join(lines) + "\n" + body
