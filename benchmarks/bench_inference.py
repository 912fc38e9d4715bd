"""Inference speed: ``medseg`` end to end vs the baseline a user would write vs the forward pass alone.

Volumes: one BraTS case (240x240x155, 3 MR channels, the trained checkpoint) and one synthetic
CT-sized volume (512x512xN int16 phantom with eight lesions, 1 channel) predicted by the same
architecture with a 1-channel input, trained inside the benchmark for ``--ct-train-steps``
on a smaller phantom (so its masks are lesion-like, not the noise of random weights). For each volume, in this one process:

- ``medseg``: ``CasePredictor.run_case`` -- read, preprocess (the checkpoint's chain),
  2.5D whole-slice window prediction (``predict_volume``, default ``InferenceConfig``),
  inversion to the source grid, post-processing, lesion table, writing every output file.
- ``baseline``: the same reading/preprocessing/inversion/writing of the mask, but prediction
  as a user would write it with MONAI: per slice, ``sliding_window_inference`` with ROI
  256x256, overlap 0.5, Gaussian blending, fp32, ``sw_batch_size=4``.
- ``forward``: the model's forward pass alone over exactly the windows medseg predicts
  (same batches, precision, memory format, the slices edge-padded onto the pooling grid as
  ``predict_volume`` places them), on tensors made before the clock starts.

Each variant runs once to warm up, then ``--repeats`` rounds with the variants interleaved;
the best time is reported with the load average at that moment (the CPUs are shared), and
the ratio to the forward bound both as best / best and as the median over rounds of medseg's
time over the bound's in the same round (the two run back to back, so a slow spell of the
shared machine hits both); ``--pair-rounds`` adds rounds of only those two. Peak
RSS per variant: the kernel's high-water mark is reset (``/proc/self/clear_refs``) before each
call and read with ``resource.getrusage`` after it. Quality: Dice between the medseg and
baseline masks, between medseg (bf16) and the same pipeline in fp32, and of each against the
BraTS reference label (whole tumour).

    .venv/bin/python benchmarks/bench_inference.py [--checkpoint runs/x/best.pt] [--ct-slices 200]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BRATS = (REPO / ".." / "shared" / "data" / "brats18").resolve()


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed_interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                      extra: dict[str, Callable[[], object]] | None = None, extra_rounds: int = 0) -> dict[str, dict]:
    """Each function once to warm up, then ``repeats`` rounds calling them in turn (interleaved,
    so a burst of load from other jobs does not hit one variant only), then ``extra_rounds``
    more rounds of only the functions named in ``extra`` (more back-to-back pairs for a
    per-round ratio without the slow baseline in between). Per function: best time, all times,
    the 1-min load average before the best call, and the peak RSS (the kernel's high-water
    mark reset before each call, read after it; max over calls)."""
    out = {name: {"times_s": [], "loads": [], "peak_rss_mb": 0.0} for name in fns}
    rounds = [fns] * (repeats + 1) + [{name: fns[name] for name in (extra or {})}] * extra_rounds
    for round_, chosen in enumerate(rounds):
        for name, fn in chosen.items():
            reset_peak_rss()
            load = os.getloadavg()[0]
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
            row = out[name]
            row["peak_rss_mb"] = max(row["peak_rss_mb"], round(peak_rss_mb(), 1))
            if round_ > 0:
                row["times_s"].append(round(seconds, 3))
                row["loads"].append(round(load, 2))
    for row in out.values():
        best = int(np.argmin(row["times_s"]))
        row["best_s"] = row["times_s"][best]
        row["load_1min"] = row.pop("loads")[best]
    return out


def find_checkpoint(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    for name in ("brats_unet_inception", "brats_deeplabv3plus", "brats"):
        path = REPO / "runs" / name / "best.pt"
        if path.is_file():
            return path
    found = sorted((REPO / "runs").glob("*/best.pt")) if (REPO / "runs").is_dir() else []
    return found[0] if found else None


def train_for(
    model: torch.nn.Module,
    device: torch.device,
    batch: Callable[[np.random.Generator], tuple[torch.Tensor, torch.Tensor]],
    seconds: float | None = None,
    steps: int | None = None,
) -> torch.nn.Module:
    """Train ``model`` on ``device`` for ``steps`` optimiser steps (the same model on every
    machine) or, without ``steps``, for ``seconds``: ``batch(rng)`` gives CPU tensors (x (N, Cin,
    H, W), y (N, 1, H, W)); AdamW lr 2e-3, Dice + BCE, bf16 autocast. Returns the model (train mode)."""
    if (seconds is None) == (steps is None):
        raise ValueError("give seconds or steps")
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(0)
    deadline = time.monotonic() + (seconds or 0.0)
    done = 0
    while done < steps if steps is not None else time.monotonic() < deadline:
        x, y = (t.to(device) for t in batch(rng))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(x).float()
        prob = torch.sigmoid(logits)
        loss = 1 - (2 * (prob * y).sum() + 1) / (prob.sum() + y.sum() + 1)
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += 1
    print(f"trained {done} steps", flush=True)
    return model


def train_fallback(out: Path, minutes: float, device: torch.device, brats: Path) -> Path:
    """No trained checkpoint: train a small 2.5D U-Net on BraTS slices for ``minutes`` (labelled in the output)."""
    from medseg.config import Config, ModelConfig, PreprocessConfig
    from medseg.models import build_model
    from medseg.models.checkpoint import save_checkpoint
    from medseg.transforms.loading import apply_chain
    from medseg.transforms.preprocessing import channel_key, context_stack, preprocess_transforms

    channels = ["flair", "t1ce", "t2"]
    pre = PreprocessConfig(context_slices=1)
    chain = preprocess_transforms(pre, "MR", channels, True)
    volumes = []
    for case in sorted(brats.iterdir())[1:9]:  # the first case is the benchmark case
        data = apply_chain(chain, {**{channel_key(c): str(case / f"{case.name}_{c}.nii.gz") for c in channels},
                                   "label": str(case / f"{case.name}_seg.nii.gz")})
        volumes.append((data["image"].as_tensor(), data["label"].as_tensor()[0].float()))
    model_cfg = ModelConfig(arch="unet", encoder="resnet18", in_channels=9, width=0.5)

    def batch(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = volumes[rng.integers(len(volumes))]
        with_lesion = torch.nonzero(label.sum((0, 1)) > 0).flatten().numpy()
        idx = rng.choice(with_lesion if rng.random() < 0.7 else np.arange(label.shape[2]), 8)
        return context_stack(image, list(map(int, idx)), 1), label[:, :, idx].permute(2, 0, 1)[:, None]

    model = train_for(build_model(model_cfg), device, batch, seconds=minutes * 60)
    config = Config(model=model_cfg, preprocess=pre)
    extra = {"config": config.model_dump(mode="json"), "channels": channels, "modality": "MR"}
    return save_checkpoint(out, model.cpu().eval(), model_cfg, extra)


def synthetic_ct(path: Path, shape: tuple[int, int, int], seed: int = 0) -> tuple[Path, Path]:
    """int16 CT phantom and its label: air, an elliptic body at 40 HU, noise (sd 15 HU), eight
    ellipsoid lesions at 110 HU (radius 4-18 px in-plane, 1-4 slices); LPS-stored grid, 0.8 x
    0.8 x 2.5 mm. Returns (image path, label path)."""
    from medseg.io import Geometry, write_volume

    rng = np.random.default_rng(seed)
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((i - shape[0] / 2) / (shape[0] * 0.42)) ** 2 + ((j - shape[1] / 2) / (shape[1] * 0.33)) ** 2 < 1
    volume = np.full(shape, -1000, np.int16)
    volume[np.broadcast_to(body, shape)] = 40
    label = np.zeros(shape, np.uint8)
    for _ in range(8):
        r = rng.uniform([4, 4, 1], [18, 18, 4])
        c = rng.uniform([0.3, 0.35, 0.1], [0.7, 0.65, 0.9]) * np.array(shape)
        label[((i - c[0]) / r[0]) ** 2 + ((j - c[1]) / r[1]) ** 2 + ((k - c[2]) / r[2]) ** 2 < 1] = 1
    volume[label > 0] = 110
    volume += rng.normal(0, 15, shape).astype(np.int16)
    geometry = Geometry(size=shape, spacing=(0.8, 0.8, 2.5), origin=(-200.0, -180.0, 50.0),
                        direction=(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    label_path = path.with_name(path.name.replace(".nii.gz", "_label.nii.gz"))
    return write_volume(volume, geometry, path, dtype=np.int16), write_volume(label, geometry, label_path)


def train_ct_model(model_cfg, preprocess, steps: int, tmp: Path, device: torch.device) -> torch.nn.Module:
    """The CT model of the benchmark: ``model_cfg`` trained for ``steps`` on four 256x256x32
    phantoms (other seeds than the benchmark volume, so lesion positions cannot be memorised),
    batches of 8 slices (70% with lesion) cropped to one random 128x128 window, Dice + BCE,
    bf16 autocast."""
    from medseg.models import build_model
    from medseg.transforms.loading import apply_chain
    from medseg.transforms.preprocessing import channel_key, context_stack, preprocess_transforms

    chain = preprocess_transforms(preprocess, "CT", ["ct"], True)
    volumes = []
    for seed in range(1, 5):
        image_path, label_path = synthetic_ct(tmp / f"ct_train{seed}.nii.gz", (256, 256, 32), seed=seed)
        data = apply_chain(chain, {channel_key("ct"): str(image_path), "label": str(label_path)})
        label = data["label"].as_tensor()[0].float()
        volumes.append((data["image"].as_tensor(), label, torch.nonzero(label.sum((0, 1)) > 0).flatten().numpy()))

    def batch(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        image, label, with_lesion = volumes[rng.integers(len(volumes))]
        idx = rng.choice(with_lesion if rng.random() < 0.7 else np.arange(label.shape[2]), 8)
        x = context_stack(image, list(map(int, idx)), preprocess.context_slices)
        y = label[:, :, idx].permute(2, 0, 1)[:, None]
        r0, c0 = (int(rng.integers(0, n - 127)) for n in x.shape[-2:])  # one random 128x128 crop per batch
        return x[..., r0 : r0 + 128, c0 : c0 + 128], y[..., r0 : r0 + 128, c0 : c0 + 128]

    torch.manual_seed(0)
    return train_for(build_model(model_cfg), device, batch, steps=steps).eval()


def cached_ct_model(model_cfg, preprocess, steps: int, tmp: Path, device: torch.device, cache: Path | None) -> torch.nn.Module:
    """``train_ct_model``, or its weights from ``cache`` when an earlier run trained the same
    model (architecture, preprocessing, steps and the source of the training code in the key)."""
    import hashlib
    import inspect

    from medseg.atomic import atomic_path
    from medseg.models import build_model

    if cache is None:
        return train_ct_model(model_cfg, preprocess, steps, tmp, device)
    code = "".join(inspect.getsource(f) for f in (train_ct_model, train_for, synthetic_ct))
    key = json.dumps([model_cfg.model_dump(mode="json"), preprocess.model_dump(mode="json"), steps, code], sort_keys=True)
    path = cache / f"ct_{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        model = build_model(model_cfg)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        print(f"CT phantom model from {path}", flush=True)
        return model.to(device).eval()
    model = train_ct_model(model_cfg, preprocess, steps, tmp, device)
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as part:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, part)
    return model


def baseline_predict(model: torch.nn.Module, image: torch.Tensor, context: int, axis: int) -> torch.Tensor:
    """What a MONAI user writes: per slice sliding_window_inference(256x256, overlap 0.5, gaussian), fp32.

    Slices smaller than the ROI are padded by edge replication, as the models pad themselves:
    MONAI's default zero padding puts a frame of "average tissue" (0 after normalisation) around
    a foreground-cropped slice, and a trained DeepLabv3+ then marked false positives there
    (Dice to the reference 0.66 against 0.90), which is a quality difference, not a speed one."""
    from monai.inferers import sliding_window_inference

    from medseg.transforms.preprocessing import context_stack

    volume = image.as_tensor() if hasattr(image, "as_tensor") else image
    device = next(model.parameters()).device
    n = volume.shape[axis]
    out = torch.empty(volume.shape[1:], dtype=torch.float32)
    out_view = torch.movedim(out, axis - 1, 0)
    with torch.no_grad():
        for z in range(n):
            x = context_stack(volume, z, context, axis=axis)[None].to(device)
            logits = sliding_window_inference(x, (256, 256), 4, model, overlap=0.5, mode="gaussian",
                                              padding_mode="replicate")
            out_view[z] = torch.sigmoid(logits[0, 0]).cpu()
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if not (a.any() or b.any()) else float(2 * (a & b).sum() / (a.sum() + b.sum()))


def bench_volume(name: str, bundle, case, repeats: int, tmp: Path, label: Path | None = None, pair_rounds: int = 0) -> dict:
    """medseg vs baseline vs forward-alone on one case (``pair_rounds`` more rounds of medseg and
    its bound only, for the per-round ratio); returns the result row."""
    import dataclasses

    import nibabel as nib

    from medseg.inference.postprocess import postprocess
    from medseg.inference.predictor import default_batch_size
    from medseg.inference.runner import CasePredictor
    from medseg.io import write_mask
    from medseg.runtime import autocast_dtype
    from medseg.transforms.preprocessing import IMAGE_KEY

    predictor = CasePredictor(bundle)
    cfg = bundle.inference
    model = bundle.models[0]
    context = bundle.config.preprocess.context_slices
    axis = predictor.ras_axis + 1
    out_medseg, out_base = tmp / f"{name}_medseg", tmp / f"{name}_baseline"

    def baseline() -> None:
        prepared = predictor.prepare(case)
        image = prepared.data[IMAGE_KEY]
        model.to(memory_format=torch.contiguous_format)
        prob = baseline_predict(model, image, context, axis)
        prob_src = predictor.to_source(prob[None], prepared)
        mask = postprocess(prob_src[0], prepared.geometry.spacing, cfg)
        write_mask(mask, prepared.geometry, out_base / f"{case.case_id}_mask.nii.gz")
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)

    # forward alone over the windows medseg predicts (whole slices here: the slice fits the ROI)
    prepared = predictor.prepare(case)
    image = prepared.data[IMAGE_KEY].as_tensor()
    stacks = forward_stacks(bundle, image, axis)
    pair = {  # medseg and its bound back to back in each round: the per-round ratio
        "medseg": lambda: predictor.run_case(case, out_medseg),
        "forward_alone": lambda: run_forward(bundle, stacks),
    }
    timings = timed_interleaved({**pair, "baseline": baseline}, repeats, pair, pair_rounds)
    medseg, base, bound = timings["medseg"], timings["baseline"], timings["forward_alone"]
    window = list(stacks[0].shape[-2:])  # the slice padded onto the pooling grid
    stacks.clear()
    n_slices = image.shape[axis]
    batch = cfg.batch_size or default_batch_size(bundle.device)

    # precision lever validated on masks: the same pipeline in fp32 (run once, untimed)
    out_fp32 = tmp / f"{name}_medseg_fp32"
    fp32_config = bundle.config.model_copy(update={"inference": cfg.model_copy(update={"precision": "fp32"})})
    CasePredictor(dataclasses.replace(bundle, config=fp32_config)).run_case(case, out_fp32)

    def read_mask(folder: Path) -> np.ndarray:
        return np.asarray(nib.load(str(folder / f"{case.case_id}_mask.nii.gz")).dataobj) > 0

    a, b, c = read_mask(out_medseg), read_mask(out_base), read_mask(out_fp32)
    quality = {"dice_medseg_vs_baseline": dice(a, b), "dice_medseg_bf16_vs_fp32": dice(a, c)}
    if label is not None:
        reference = np.asarray(nib.load(str(label)).dataobj) > 0
        quality |= {"dice_vs_label_medseg": dice(a, reference), "dice_vs_label_medseg_fp32": dice(c, reference),
                    "dice_vs_label_baseline": dice(b, reference)}
    marker = json.loads((out_medseg / f"{case.case_id}_complete.json").read_text())
    per_round = [m / f for m, f in zip(medseg["times_s"], bound["times_s"], strict=True)]  # back to back in each round
    speedup_rounds = len(base["times_s"])  # the baseline's rounds: medseg's best among those same rounds
    return {
        "volume": name, "source_shape": list(prepared.geometry.size), "predicted_grid": list(image.shape[1:]),
        "slices_predicted": n_slices, "window": window, "batch": batch,
        "precision": str(autocast_dtype(cfg.precision, bundle.device)), "medseg": medseg, "baseline": base,
        "forward_alone": bound, "speedup_vs_baseline": base["best_s"] / min(medseg["times_s"][:speedup_rounds]),
        "ratio_to_forward": medseg["best_s"] / bound["best_s"],
        "ratio_to_forward_per_round": [round(r, 3) for r in per_round],
        "ratio_to_forward_median": float(np.median(per_round)),
        **quality,
        "lesion_voxels": {"medseg": int(a.sum()), "baseline": int(b.sum()), "medseg_fp32": int(c.sum())},
        "medseg_stage_seconds": marker["timings_s"],
        "medseg_write_seconds": marker["write_seconds"],
    }


def forward_stacks(bundle, image: torch.Tensor, axis: int) -> list[torch.Tensor]:
    """The 2.5D batches ``predict_volume`` feeds the model for ``image``: whole-slice windows,
    edge-padded onto the pooling grid as ``predict_volume`` places them."""
    import torch.nn.functional as F

    from medseg.inference.predictor import default_batch_size, effective_roi, network_stride, window_padding
    from medseg.transforms.preprocessing import context_stack

    cfg = bundle.inference
    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    n_slices = image.shape[axis]
    plane = [s for i, s in enumerate(image.shape[1:], start=1) if i != axis]
    (top, bottom), (left, right) = window_padding(plane, cfg.roi_size, network_stride(bundle.models))
    padded = (plane[0] + top + bottom, plane[1] + left + right)
    assert tuple(effective_roi(cfg.roi_size, padded)) == padded, "the forward-alone bound assumes one window per slice"
    batch = cfg.batch_size or default_batch_size(bundle.device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    context = bundle.config.preprocess.context_slices
    return [F.pad(context_stack(image, list(range(s, min(s + batch, n_slices))), context, axis=axis),
                  [left, right, top, bottom], mode="replicate").to(bundle.device).contiguous(memory_format=fmt)
            for s in range(0, n_slices, batch)]


def run_forward(bundle, stacks: list[torch.Tensor]) -> None:
    from medseg.inference.predictor import EnsembleProbability
    from medseg.runtime import autocast_dtype

    net = EnsembleProbability(bundle.models, (), autocast_dtype(bundle.inference.precision, bundle.device), False)
    with torch.inference_mode():
        for x in stacks:
            for model in bundle.models:
                net._forward(model, x)
    if bundle.device.type == "cuda":
        torch.cuda.synchronize(bundle.device)


def bench_batch(bundle, cases, tmp: Path, repeats: int) -> dict:
    """``run_inference`` over several cases with and without prefetch, vs the forward passes alone."""
    import dataclasses
    import itertools
    import shutil

    from medseg.inference.runner import CasePredictor, run_inference
    from medseg.transforms.preprocessing import IMAGE_KEY

    predictor = CasePredictor(bundle)
    axis = predictor.ras_axis + 1
    stacks = [s for case in cases for s in forward_stacks(bundle, predictor.prepare(case).data[IMAGE_KEY], axis)]
    counter = itertools.count()

    def batch_run(prefetch: bool) -> None:
        config = bundle.config.model_copy(update={"inference": bundle.inference.model_copy(update={"prefetch": prefetch})})
        out = tmp / f"batch_{next(counter)}"
        summary = run_inference(cases, dataclasses.replace(bundle, config=config), out, show_progress=False)
        assert len(summary.done) == len(cases), summary.failures
        shutil.rmtree(out)

    timings = timed_interleaved({
        "forward_alone": lambda: run_forward(bundle, stacks),
        "run_inference_no_prefetch": lambda: batch_run(False),
        "run_inference_prefetch": lambda: batch_run(True),
    }, repeats)
    stacks.clear()
    forward = timings["forward_alone"]["best_s"]
    for name in ("run_inference_no_prefetch", "run_inference_prefetch"):
        timings[name]["ratio_to_forward"] = round(timings[name]["best_s"] / forward, 3)
    return {"cases": [c.case_id for c in cases], **timings}


def sweep(bundle, case, repeats: int) -> list[dict]:
    """Forward throughput (slices/s) on the BraTS case's stacks for batch size x memory format x
    precision, interleaved, best of ``repeats`` rounds (justifies the ``InferenceConfig`` defaults)."""
    from medseg.inference.runner import CasePredictor
    from medseg.transforms.preprocessing import IMAGE_KEY, context_stack

    predictor = CasePredictor(bundle)
    axis = predictor.ras_axis + 1
    image = predictor.prepare(case).data[IMAGE_KEY].as_tensor()
    n = min(48, image.shape[axis])
    first = (image.shape[axis] - n) // 2
    stacks = context_stack(image, list(range(first, first + n)), bundle.config.preprocess.context_slices, axis=axis)
    model = bundle.models[0]
    threads = torch.get_num_threads()
    grid = [(b, cl, prec, threads) for prec in ("bf16", "fp32") for cl in (True, False) for b in (1, 2, 4, 8, 16)]
    grid += [(b, True, "bf16", 1) for b in (2, 4, 8)] if threads > 1 else []
    best = dict.fromkeys(grid, 0.0)
    loads = []
    with torch.inference_mode():
        for _ in range(repeats):
            loads.append(os.getloadavg()[0])
            for b, cl, prec, n_threads in grid:
                torch.set_num_threads(n_threads)
                model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
                fmt = torch.channels_last if cl else torch.contiguous_format
                batches = [stacks[i : i + b].contiguous(memory_format=fmt) for i in range(0, n, b)]
                start = time.perf_counter()
                for x in batches:
                    if prec == "bf16":
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            model(x)
                    else:
                        model(x)
                best[(b, cl, prec, n_threads)] = max(best[(b, cl, prec, n_threads)], n / (time.perf_counter() - start))
    torch.set_num_threads(threads)
    model.to(memory_format=torch.channels_last if bundle.inference.channels_last else torch.contiguous_format)
    rows = [{"batch": b, "channels_last": cl, "precision": prec, "threads": t, "slices_per_s": round(v, 1)}
            for (b, cl, prec, t), v in best.items()]
    print(f"sweep on {n} slices of {tuple(stacks.shape[-2:])}, load {loads}")
    for r in rows:
        print(r)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="trained checkpoint (default: runs/*/best.pt, else a fallback is trained)")
    parser.add_argument("--case", default="Brats18_2013_20_1", help="BraTS case folder name (a validation case of runs/brats)")
    parser.add_argument("--batch-cases", type=int, default=4, help="BraTS cases of the batch (prefetch) measurement; 0 = skip")
    parser.add_argument("--ct-slices", type=int, default=200)
    parser.add_argument("--ct-train-steps", type=int, default=1200,
                        help="optimiser steps of the CT phantom model (a fixed count: the same model on every machine; "
                             "~8 min on 2 CPU cores, Dice ~0.99 to the phantom's lesions)")
    parser.add_argument("--ct-model-cache", default="runs/bench/ct_models",
                        help="folder keeping trained CT phantom models for later runs ('' = always train)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pair-rounds", type=int, default=0,
                        help="more rounds of medseg and its forward bound only (no baseline), for the per-round ratio")
    parser.add_argument("--train-minutes", type=float, default=5.0, help="fallback training time")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="inference.key=value for medseg")
    parser.add_argument("--sweep", action="store_true", help="only the batch / memory format / precision sweep")
    parser.add_argument("--threads", type=int, help="torch threads for every variant (default: torch's, one per core)")
    parser.add_argument("--skip-ct", action="store_true", help="only the BraTS volume (and the batch)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (medseg, baseline and forward bound all on it)")
    parser.add_argument("--brats-dir", default=str(BRATS), help="folder of BraTS case folders")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from medseg.config import ModelConfig
    from medseg.inference import prepare_models
    from medseg.inference.cases import InferenceCase
    from medseg.inference.runner import InferenceBundle, load_bundle

    brats = Path(args.brats_dir).resolve()
    if not brats.is_dir():
        print(f"BraTS data not found at {brats}", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    results: dict = {"date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                     "load_at_start": os.getloadavg(), "device": str(device),
                     "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    with tempfile.TemporaryDirectory(prefix="medseg-bench-") as tmp_name:
        tmp = Path(tmp_name)
        ckpt = find_checkpoint(args.checkpoint)
        if ckpt is None:
            print(f"no trained checkpoint found: training a fallback model on BraTS for {args.train_minutes} min", flush=True)
            ckpt = train_fallback(tmp / "fallback.pt", args.train_minutes, device, brats)
            results["model_source"] = f"fallback: trained inside this benchmark for {args.train_minutes} min on 8 BraTS cases"
        else:
            results["model_source"] = str(ckpt)
        bundle = load_bundle([ckpt], args.overrides, str(device))
        results["model"] = bundle.config.model.model_dump(mode="json", exclude_none=True)
        results["parameters_m"] = round(sum(p.numel() for p in bundle.models[0].parameters()) / 1e6, 2)
        results["inference"] = bundle.inference.model_dump(mode="json")
        case_dir = brats / args.case
        brats_case = InferenceCase(args.case, {c: case_dir / f"{args.case}_{c}.nii.gz" for c in bundle.channels})
        if args.sweep:
            results["sweep"] = sweep(bundle, brats_case, args.repeats)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
            return 0
        rows = [bench_volume("brats", bundle, brats_case, args.repeats, tmp, case_dir / f"{args.case}_seg.nii.gz",
                             args.pair_rounds)]
        print(json.dumps(rows[-1], indent=1), flush=True)
        if args.batch_cases:
            names = [args.case, *[p.name for p in sorted(brats.iterdir()) if p.name != args.case]][: args.batch_cases]
            batch_cases = [InferenceCase(n, {c: brats / n / f"{n}_{c}.nii.gz" for c in bundle.channels}) for n in names]
            results["batch"] = bench_batch(bundle, batch_cases, tmp, max(1, args.repeats - 1))
            print(json.dumps(results["batch"], indent=1), flush=True)

        if not args.skip_ct:
            ct_path, ct_label = synthetic_ct(tmp / "ct.nii.gz", (512, 512, args.ct_slices))
            context = bundle.config.preprocess.context_slices
            ct_model_cfg = ModelConfig.model_validate({**bundle.config.model.model_dump(), "in_channels": 2 * context + 1})
            ct_model = cached_ct_model(ct_model_cfg, bundle.config.preprocess, args.ct_train_steps, tmp, device,
                                       Path(args.ct_model_cache) if args.ct_model_cache else None)
            results["ct_model_source"] = (f"{ct_model_cfg.arch}/{ct_model_cfg.encoder} trained by this benchmark for "
                                          f"{args.ct_train_steps} steps on four synthetic 256x256x32 CT phantoms")
            prepare_models([ct_model], str(device), bundle.inference.channels_last)
            config = bundle.config.model_copy(update={"model": ct_model_cfg})
            ct_bundle = InferenceBundle([ct_model], config, ["ct"], "CT", [], device)
            rows.append(bench_volume(f"ct512x512x{args.ct_slices} (synthetic)", ct_bundle,
                                     InferenceCase("ct", {"ct": ct_path}), args.repeats, tmp, ct_label, args.pair_rounds))
            print(json.dumps(rows[-1], indent=1), flush=True)
    results["rows"] = rows
    print("\n| volume | medseg s | baseline s | forward alone s | speed-up | ratio to forward (best / median of rounds) | Dice bf16 vs fp32 | Dice vs baseline | peak RSS MB (medseg / baseline) | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['volume']} | {r['medseg']['best_s']:.2f} | {r['baseline']['best_s']:.2f} | {r['forward_alone']['best_s']:.2f} | "
              f"{r['speedup_vs_baseline']:.2f}x | {r['ratio_to_forward']:.2f}x / {r['ratio_to_forward_median']:.2f}x | {r['dice_medseg_bf16_vs_fp32']:.4f} | {r['dice_medseg_vs_baseline']:.4f} | "
              f"{r['medseg']['peak_rss_mb']:.0f} / {r['baseline']['peak_rss_mb']:.0f} | "
              f"{r['medseg']['load_1min']} / {r['baseline']['load_1min']} / {r['forward_alone']['load_1min']} |")
    if "batch" in results:
        b = results["batch"]
        print(f"\nbatch of {len(b['cases'])} BraTS cases: forward alone {b['forward_alone']['best_s']:.2f} s, "
              f"run_inference without prefetch {b['run_inference_no_prefetch']['best_s']:.2f} s "
              f"({b['run_inference_no_prefetch']['ratio_to_forward']:.2f}x), with prefetch "
              f"{b['run_inference_prefetch']['best_s']:.2f} s ({b['run_inference_prefetch']['ratio_to_forward']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
