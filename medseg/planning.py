"""Experiment planning: a dataset fingerprint -> a full medseg config, by documented rules.

Like nnU-Net's experiment planner, for medseg's 2D/2.5D models: :func:`plan_dataset` reads a
manifest, fingerprints its cross-validation pool (:mod:`medseg.fingerprint`; test cases are
never read) and writes the config YAML with one comment line per decision, plus
``fingerprint.json`` beside it. :func:`plan_from_fingerprint` applies the rules alone.

Axes are RAS ``(R, A, S)``: R = sagittal slices, A = coronal, S = axial. "Round" below means
round half up.

Rules and their constants
-------------------------
================================  ===========================================================
setting                           rule (constants in capitals, defined below)
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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import ValidationError

from medseg.config import Config, LabelConfig, PreprocessConfig, format_validation_error
from medseg.errors import ConfigError, ManifestError, MedsegError

if TYPE_CHECKING:
    from medseg.manifest import Case

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
MEASURE_CASES = 3
ALL_CORES_GAIN = 1.1
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


def plan_device(device: str) -> Literal["cpu", "cuda"]:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cpu``/``cuda`` unchanged."""
    if device == "auto":
        return "cuda" if torch_sees_gpu() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    return device  # type: ignore[return-value]


def torch_sees_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def choose_slice_axis(spacing: list[float]) -> tuple[int, str]:
    """(RAS index, reason) of the slice axis for median spacings ``(R, A, S)``."""
    largest, smallest = max(spacing), min(spacing)
    mm = " x ".join(f"{AXIS_LETTERS[i]} {_fmt(s)}" for i, s in enumerate(spacing))
    if largest > ANISOTROPY_RATIO * smallest:
        # ties: prefer axial, then coronal, then sagittal
        axis = next(i for i in (2, 1, 0) if spacing[i] == largest)
        return axis, (f"median spacing {mm} mm: {AXIS_LETTERS[axis]} is {_fmt(largest / smallest)}x the finest "
                      f"(> {ANISOTROPY_RATIO}x), slice across it")
    return 2, f"median spacing {mm} mm is within {ANISOTROPY_RATIO}x of isotropic: axial"


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


def plan_from_fingerprint(
    fingerprint: dict,
    manifest: str,
    device: Literal["cpu", "cuda"] = "cpu",
    minutes_per_fold: float | None = None,
    labels: LabelConfig | None = None,
    cpu_bf16: bool | None = None,
    throughput: float | MeasuredSpeed | None = None,
) -> Plan:
    """Apply the rules of the module docstring to ``fingerprint`` (``medseg.fingerprint``).

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
    rules: list[str] = []
    cases = fingerprint["cases"]
    modality = str(fingerprint["modality"]).upper()
    channels = list(fingerprint["channels"])

    # labels
    foreground = labels.foreground if labels is not None else "nonzero"
    allowed = (labels.allowed_values if labels is not None and labels.allowed_values is not None
               else sorted(int(v) for v in fingerprint["label_values"]))
    rules.append(f"data.labels.foreground = {foreground}; allowed_values = {allowed}: label values seen in "
                 f"{fingerprint['n_cases']} pool case(s)")

    # slice axis
    spacing = [float(s) for s in fingerprint["spacing_median"]]
    axis, why = choose_slice_axis(spacing)
    axis_name = AXIS_NAMES[axis]
    inplane = [i for i in range(3) if i != axis]
    rules.append(f"preprocess.slice_axis = {axis_name} (and stats.axis, evaluation.slice_axis): {why}")

    # in-plane spacing
    median_inplane = [spacing[i] for i in inplane]
    off = [
        (row["case_id"], [row["spacing"][i] for i in inplane])
        for row in cases
        if any(abs(row["spacing"][i] - m) > SPACING_TOLERANCE * m for i, m in zip(inplane, median_inplane, strict=True))
    ]
    plane = "x".join(AXIS_LETTERS[i] for i in inplane)
    if not off:
        spacing_inplane = None
        rules.append(f"preprocess.spacing_inplane = null (native grid): every case's {plane} spacing lies within "
                     f"{SPACING_TOLERANCE:.0%} of the median {_fmt(median_inplane[0])} x {_fmt(median_inplane[1])} mm")
        target = None
    else:
        spacing_inplane = [round(s, 4) for s in median_inplane]
        target = spacing_inplane
        example = ", ".join(f"{cid} {' x '.join(_fmt(s) for s in sp)}" for cid, sp in off[:3])
        rules.append(f"preprocess.spacing_inplane = {spacing_inplane}: {len(off)} case(s) lie more than "
                     f"{SPACING_TOLERANCE:.0%} from the median {plane} spacing (e.g. {example} mm); resample to the median")

    # context
    slice_spacing = spacing[axis]
    k = min(max(round_half_up(CONTEXT_MM / slice_spacing), MIN_CONTEXT), MAX_CONTEXT)
    rules.append(f"preprocess.context_slices = {k}: {_fmt(CONTEXT_MM)} mm of context / median slice spacing "
                 f"{_fmt(slice_spacing)} mm, rounded, clamped to [{MIN_CONTEXT}, {MAX_CONTEXT}]")

    # model
    in_channels = len(channels) * (2 * k + 1)
    model = {**MODEL_RECIPE, "in_channels": in_channels}
    rules.append(f"model.in_channels = {in_channels}: {len(channels)} channel(s) {channels} x {2 * k + 1} slices; "
                 f"model = {MODEL_RECIPE['arch']} / {MODEL_RECIPE['encoder']}, width {MODEL_RECIPE['width']} "
                 f"(recipe, chosen by cross-validation: docs/benchmarks.md)")

    # patch: the training slice is the foreground box plus the preprocessing crop margin
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
    rules.append(f"train.patch_size = {patch}: median cropped {plane} slice "
                 f"{_fmt(median_extent[0])} x {_fmt(median_extent[1])} px (foreground box + 2 x "
                 f"{margin} px crop margin{', after resampling' if target is not None else ''}), to the nearest "
                 f"multiple of {PATCH_MULTIPLE}, clamped to [{lo}, {hi}] ({device})")

    # normalisation
    preprocess: dict[str, Any] = {
        "slice_axis": axis_name,
        "context_slices": k,
        "spacing_inplane": spacing_inplane,
    }
    if modality == "CT":
        first = channels[0]
        lesion = (fingerprint.get("intensity", {}).get(first) or {}).get("lesion")
        if lesion is None:
            rules.append("preprocess.ct_window = default: no lesion voxels in the pool to measure it on")
        else:
            low, high = (float(lesion[p]) for p in CT_WINDOW_PERCENTILES)
            measured = f"[{_fmt(low)}, {_fmt(high)}]"
            if high - low < CT_MIN_WINDOW_HU:
                centre = (low + high) / 2
                low, high = centre - CT_MIN_WINDOW_HU / 2, centre + CT_MIN_WINDOW_HU / 2
            window = [round(low, 1), round(high, 1)]
            preprocess["ct_window"] = window
            rules.append(f"preprocess.ct_window = {window}: 0.5-99.5 percentiles of {first} inside the lesions "
                         f"{measured} HU, widened to at least {_fmt(CT_MIN_WINDOW_HU)} HU")
    else:
        rules.append("preprocess.mr_percentiles = [0.5, 99.5] (default): MR channels are clipped to their foreground "
                     "percentiles and z-scored")

    # batch size and epochs
    area_ratio = REFERENCE_PATCH[0] * REFERENCE_PATCH[1] / (patch[0] * patch[1])
    if device == "cpu":
        batch = BATCH_CPU
        rules.append(f"train.batch_size = {batch}: CPU")
    else:
        batch = min(max(power_of_two(BATCH_CUDA * area_ratio), BATCH_CUDA_RANGE[0]), BATCH_CUDA_RANGE[1])
        rules.append(f"train.batch_size = {batch}: {BATCH_CUDA} at {REFERENCE_PATCH[0]}x{REFERENCE_PATCH[1]} x "
                     f"area ratio {area_ratio:.3g}, to a power of two in {list(BATCH_CUDA_RANGE)}")
    threads, why_threads = WORKERS[device]["threads"], ""
    if isinstance(throughput, (int, float)):
        throughput = MeasuredSpeed(float(throughput), f"{batch} x {patch[0]}x{patch[1]} steps of the planned model",
                                   threads)
    if throughput is not None:
        if not throughput.slices_per_s > 0:
            raise ConfigError(f"measured training throughput must be positive, got {throughput.slices_per_s}")
        kind = f"measured on this machine: {throughput.what}"
        threads, why_threads = throughput.threads, throughput.why_threads
        throughput = throughput.slices_per_s
    elif device == "cpu":
        if cpu_bf16 is None:
            from medseg.runtime import cpu_has_fast_bf16

            cpu_bf16 = cpu_has_fast_bf16()
        throughput = (THROUGHPUT_CPU if cpu_bf16 else THROUGHPUT_CPU_FP32) * area_ratio
        kind = "assumed, cpu, bf16" if cpu_bf16 else "assumed, cpu without bf16 instructions, fp32"
    else:
        throughput, kind = THROUGHPUT_CUDA * area_ratio, "assumed, cuda"
    budget_epochs = math.floor(minutes * 60 * throughput / SAMPLES_PER_EPOCH)
    epochs = min(max(budget_epochs, EPOCH_RANGE[0]), EPOCH_RANGE[1])
    candidates = PLAN_CANDIDATES if budget_epochs >= len(PLAN_CANDIDATES) * EPOCH_RANGE[1] else []
    models_per_fold = max(len(candidates), 1)
    repeats = min(max(budget_epochs // (EPOCH_RANGE[1] * models_per_fold), 1), MAX_REPEATS)
    max_minutes = MAX_MINUTES_FACTOR * minutes
    rules.append(f"train.epochs = {epochs}: {_fmt(minutes)} min/fold x {_fmt(throughput)} slices/s ({kind}) / "
                 f"{SAMPLES_PER_EPOCH} slices per epoch, clamped to {list(EPOCH_RANGE)}; "
                 f"max_minutes = {_fmt(max_minutes)} ({MAX_MINUTES_FACTOR} x budget)")

    train: dict[str, Any] = {
        **TRAIN_RECIPE,
        **WORKERS[device],
        "threads": threads,
        "device": device,
        "epochs": epochs,
        "batch_size": batch,
        "patch_size": patch,
        "max_minutes": max_minutes,
    }
    rules.append(f"train.device = {device}; num_workers = {WORKERS[device]['num_workers']}, "
                 f"threads = {threads or 'null'}{why_threads}; optimiser, schedule, loss, EMA: the BraTS recipe")
    if n_patients < STRONG_AUGMENT_BELOW:
        train["augment"] = dict(STRONG_AUGMENT)
        rules.append(f"train.augment = strong (rotate 30 deg, scale 0.25, elastic 0.3, ...): {n_patients} patients "
                     f"< {STRONG_AUGMENT_BELOW} over-fit fast")
    else:
        rules.append(f"train.augment = defaults: {n_patients} patients >= {STRONG_AUGMENT_BELOW}")

    # inference
    volumes = fingerprint.get("lesion_volume_mm3")
    lo_mm3, hi_mm3 = MIN_LESION_RANGE
    if volumes is None:
        min_lesion = lo_mm3
        rules.append(f"inference.min_lesion_mm3 = {_fmt(min_lesion)}: no lesions in the pool, the lower bound")
    else:
        p5 = float(volumes["p5"])
        min_lesion = min(max(one_significant_digit(p5 / 2), lo_mm3), hi_mm3)
        rules.append(f"inference.min_lesion_mm3 = {_fmt(min_lesion)}: half the 5th percentile {_fmt(p5)} mm3 of "
                     f"{fingerprint['n_lesions']} lesion volumes, 1 significant digit, clamped to "
                     f"[{_fmt(lo_mm3)}, {_fmt(hi_mm3)}] (the CV stage refines it)")
    rules.append(f"inference.threshold = {THRESHOLD}")
    objective, why_objective = postprocess_objective(fingerprint, min_lesion)
    rules.append(f"cv.postprocess.objective = {objective}: {why_objective}")

    folds = min(FOLDS, n_patients)
    rules.append(f"cv.folds = {folds}: {n_patients} patients in the pool (at most {FOLDS})")
    if candidates:
        rules.append(f"cv.candidates = {[c['name'] for c in candidates]}, try_tta: the budget holds {budget_epochs} epochs "
                     f"per fold, >= {len(candidates)} x {EPOCH_RANGE[1]}: each cross-validated, the best single one or "
                     "pair and mirroring chosen on the out-of-fold predictions")
    else:
        rules.append(f"cv.candidates = none: the budget holds {budget_epochs} epochs per fold, under "
                     f"{len(PLAN_CANDIDATES)} x {EPOCH_RANGE[1]} (one full model per candidate): the recipe's network only")
    rules.append(f"cv.repeats = {repeats}: the budget holds {budget_epochs} epochs per fold, one model trains at most "
                 f"{EPOCH_RANGE[1]}; {budget_epochs} // ({EPOCH_RANGE[1]} x {models_per_fold} candidate(s)) models "
                 f"(seeds) per fold, averaged, clamped to [1, {MAX_REPEATS}]")

    tree = {
        "data": {"manifest": str(manifest), "labels": {"foreground": foreground, "allowed_values": allowed}},
        "stats": {"axis": axis_name},
        "preprocess": preprocess,
        "model": model,
        "evaluation": {"slice_axis": axis_name},
        "inference": {"threshold": THRESHOLD, "min_lesion_mm3": min_lesion},
        "train": train,
        "cv": {"folds": folds, "repeats": repeats, "postprocess": {"objective": objective},
               "candidates": [dict(c) for c in candidates], "try_tta": bool(candidates)},
    }
    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:  # a rule produced an invalid value: a bug, reported in full
        raise ConfigError(format_validation_error(f"plan for {manifest}", exc)) from None
    return Plan(config=config, rules=rules, fingerprint=fingerprint)


def postprocess_objective(fingerprint: dict[str, Any], min_lesion_mm3: float) -> tuple[str, str]:
    """``cv.postprocess.objective`` from the pool's lesions per case: ``both`` (lesion F1 first,
    then Dice) when the median case holds :data:`MULTI_LESION_CASES` or more lesions of at least
    ``min_lesion_mm3`` (metastases, MS plaques: a rule that wins Dice by dropping small components
    deletes lesions), else ``dice`` (one lesion per case, e.g. a glioma and its 1-voxel specks).
    Returns (objective, reason)."""
    counts = [sum(v >= min_lesion_mm3 for v in case.get("lesion_volumes_mm3", ())) for case in fingerprint.get("cases", ())]
    if not counts:
        return "dice", "no labelled case in the pool"
    median = float(statistics.median(counts))
    how = f"median {_fmt(median)} lesion(s) >= {_fmt(min_lesion_mm3)} mm3 per case over {len(counts)} case(s)"
    if median >= MULTI_LESION_CASES:
        return "both", (f"{how} (>= {MULTI_LESION_CASES}: several lesions per case): the best Dice among the rules "
                        "within cv.postprocess.lesion_f1_margin of the best lesion F1")
    return "dice", f"{how} (< {MULTI_LESION_CASES}): one lesion per case, rules ranked by Dice"


def plan_yaml(plan: Plan, header: str = "") -> str:
    """The config as YAML (the form of ``medseg.config.dump_config``) under a comment header
    listing the rules."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    lines += ["# Planned by `medseg plan` (medseg/planning.py); one line per decision:"]
    lines += [f"#   {rule}" for rule in plan.rules]
    body = yaml.safe_dump(plan.config.model_dump(mode="json"), sort_keys=False)
    return "\n".join(lines) + "\n" + body


def measure_speed(config: Config, pool: list[Case], manifest: Path, device: Literal["cpu", "cuda"]) -> MeasuredSpeed:
    """The planned ``config``'s training speed on this machine. CPU: whole training steps with
    batches through the data pipeline on the first ``MEASURE_CASES`` cases of ``pool``
    (:func:`medseg.engine.throughput.measure_pipeline_throughput`), with 1 thread and with every
    core; every core is kept when it is ``ALL_CORES_GAIN`` x faster (the loader worker shares
    the cores, and other jobs on a shared machine slow the all-core run most). GPU: the
    optimiser step alone (:func:`medseg.engine.throughput.measure_training_throughput`)."""
    import torch

    from medseg.engine.setup import TrainingCases
    from medseg.engine.throughput import measure_pipeline_throughput, measure_training_throughput

    t = config.train
    shape = f"{t.batch_size} x {t.patch_size[0]}x{t.patch_size[1]}"
    if device == "cuda":
        return MeasuredSpeed(measure_training_throughput(config, device), f"{shape} steps of the planned model", t.threads)
    sample = TrainingCases(manifest, pool[:MEASURE_CASES], [], pool[0].channels, pool[0].modality)
    what = f"{shape} steps of the planned model, batches through the data pipeline"

    def at(threads: int | None) -> float:
        cfg = config.model_copy(deep=True)
        cfg.train.threads = threads
        return measure_pipeline_throughput(cfg, sample, device)

    one = at(1)
    cores = torch.get_num_threads()
    if cores < 2:
        return MeasuredSpeed(one, f"{what}, 1 thread", 1, " (PyTorch uses 1 core here)")
    every = at(None)
    compared = f"{_fmt(every)} slices/s with all {cores} threads vs {_fmt(one)} with 1 (measured)"
    if every >= ALL_CORES_GAIN * one:
        return MeasuredSpeed(every, f"{what}, {cores} threads", None, f" (every core: {compared})")
    return MeasuredSpeed(one, f"{what}, 1 thread", 1, f" ({compared}: under {ALL_CORES_GAIN}x)")


def plan_dataset(
    manifest: str | Path,
    out: str | Path,
    device: str = "cpu",
    minutes_per_fold: float | None = None,
    progress: bool = True,
    cpu_bf16: bool | None = None,
    measure: bool = True,
) -> Plan:
    """Fingerprint the manifest's cross-validation pool, plan a config and write it to ``out``
    (YAML with the rules as a comment header) and ``fingerprint.json`` beside it (both atomic).

    ``device``: ``cpu``, ``cuda`` or ``auto`` (cuda when torch sees a GPU). ``measure``: time
    the planned model's training steps on this machine (:func:`measure_speed`; CPU 20-60 s, GPU
    10-30 s) and size the epochs (and, on a CPU, the threads) from that; without it, or when
    planning for a GPU this machine lacks, the assumed throughput of
    :func:`plan_from_fingerprint` (``cpu_bf16``: ``None`` = this machine's CPU). Raises
    ``ManifestError`` naming the manifest when no labelled case lies outside the test split or
    the pool mixes modalities, ``ConfigError`` for fewer than 2 patients.
    """
    from medseg import atomic
    from medseg.fingerprint import compute_fingerprint
    from medseg.folds import cv_pool
    from medseg.manifest import read_manifest

    resolved = plan_device(device)
    cases = read_manifest(manifest)
    pool = cv_pool(cases)
    if not pool:
        raise ManifestError(manifest, ["no labelled case outside the test split: planning needs labelled "
                                       "train/val/unassigned cases (test cases are never looked at)"])
    modalities = sorted({c.modality.upper() for c in pool})
    if len(modalities) > 1:
        raise ManifestError(manifest, [f"the pool mixes modalities {modalities}; plan one modality per manifest"])
    fingerprint = compute_fingerprint(pool, LabelConfig(), progress=progress)
    plan = plan_from_fingerprint(fingerprint, str(manifest), resolved, minutes_per_fold, cpu_bf16=cpu_bf16)
    if measure and (resolved == "cpu" or torch_sees_gpu()):
        try:
            measured = measure_speed(plan.config, pool, Path(manifest), resolved)
        except (RuntimeError, MedsegError) as exc:  # e.g. out of GPU memory: the assumed speed, said in the rules
            plan.rules.append(f"training throughput not measured ({type(exc).__name__}: {str(exc)[:200]}); "
                              "the epochs use the assumed throughput")
        else:
            plan = plan_from_fingerprint(fingerprint, str(manifest), resolved, minutes_per_fold, throughput=measured)
    out_path = Path(out)
    header = f"medseg plan {manifest} ({resolved}, fingerprint: {out_path.parent / 'fingerprint.json'})"
    atomic.write_json(out_path.parent / "fingerprint.json", fingerprint)
    atomic.write_text(out_path, plan_yaml(plan, header))
    return plan
