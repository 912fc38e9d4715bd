"""Runtime backends on the CPU: seconds per case of torch fp32, torch auto (bf16 autocast where the
CPU has it) and each compiled backend/precision (medseg.inference.backends), on one BraTS case
(a fold model of the model folder, default runs/qc_brats/model) and on a synthetic 512x512xN CT
volume (bench_inference's phantom and its CT model, trained here or taken from its cache).

Per variant: ``seconds`` = read + preprocess + ``predict_volume`` + inversion + post-processing
of the case (:class:`medseg.inference.case.CasePredictor`, no file written), best of
``--repeats`` with the variants interleaved; ``forward`` = the variant's network alone over the
exact batches ``predict_volume`` feeds it (tensors made before the clock starts); ratios to torch
fp32 and to the variant's own forward bound; Dice of its post-processed mask against torch
fp32's; peak RSS of the call (``/proc/self/clear_refs`` reset before it). int8 is calibrated on
32 stacks (evenly spread over the slices) of cases other than the benchmarked one: BraTS
training cases of the fold's manifest, a CT phantom of another seed. The compiled models are
used directly, without ``medseg accelerate``'s acceptance check (this measures speed; the
acceptance is that command's job). Run it on a quiet machine; writes a markdown table and JSON.

    .venv/bin/python benchmarks/bench_backends.py [--model runs/qc_brats/model] [--fold 0] [--ct-slices 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import cached_ct_model, forward_stacks, peak_rss_mb, reset_peak_rss, synthetic_ct  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("torch-fp32", "torch-auto", "onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-bf16",
            "openvino-int8")  # fmt: skip


def calibration_from(bundle, case, n: int = 32) -> list[np.ndarray]:
    """``n`` (1, Cin, H, W) stacks of ``case`` through the bundle's chain, spread over its slices."""
    from medseg.inference.case import CasePredictor

    predictor = CasePredictor(bundle)
    image = predictor.prepare(case).data["image"]
    stacks = torch.cat(forward_stacks(bundle, image, predictor.ras_axis + 1)).contiguous()
    picks = np.linspace(0, stacks.shape[0] - 1, min(n, stacks.shape[0])).round().astype(int)
    return [stacks[i : i + 1].numpy().copy() for i in picks]


def variant_bundle(torch_bundle, name: str, tmp: Path, calibration: list[np.ndarray]):
    """The bundle of variant ``name`` (``<backend>-<precision>``): torch ones by settings, compiled
    ones with :func:`medseg.inference.compilation.compile_model`'s models in place of the torch ones."""
    from medseg.inference import backends, compilation

    backend, precision = name.split("-")
    if backend == "torch":
        inference = torch_bundle.inference.model_copy(update={"precision": precision})
        return dataclasses.replace(torch_bundle, config=torch_bundle.config.model_copy(update={"inference": inference}))
    precision = backends.resolve_precision(backend, precision)
    models = []
    for k, model in enumerate(torch_bundle.models):
        files = compilation.compile_model(model, torch_bundle.config.model.in_channels, tmp / name, f"m{k}", backend,
                                       precision, calibration)  # fmt: skip
        models.append(backends.load_backend_model(files[0], backend, precision, int(getattr(model, "multiple", 1)),
                                                  torch_bundle.inference.threads))  # fmt: skip
    inference = torch_bundle.inference.model_copy(update={"backend": backend, "precision": precision})
    return dataclasses.replace(torch_bundle, models=models,
                               config=torch_bundle.config.model_copy(update={"inference": inference}))  # fmt: skip


def run_case(bundle, case) -> np.ndarray:
    from medseg.inference.case import CasePredictor

    predictor = CasePredictor(bundle)
    prepared = predictor.prepare(case)
    prob, _ = predictor.probabilities(prepared)
    return predictor.finish(prepared, prob).mask


def run_forward(bundle, stacks: list[torch.Tensor]) -> None:
    from medseg.inference.predictor import EnsembleProbability
    from medseg.runtime import autocast_dtype

    amp = autocast_dtype(bundle.inference.precision, bundle.device) if bundle.inference.backend == "torch" else None
    net = EnsembleProbability(bundle.models, (), amp, False)
    with torch.inference_mode():
        for x in stacks:
            for model in bundle.models:
                net._forward(model, x)


def measured(fn: Callable[[], object]) -> tuple[float, float, object]:
    reset_peak_rss()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, peak_rss_mb(), out


def bench(title: str, torch_bundle, case, calibration, variants: list[str], repeats: int, tmp: Path) -> list[dict]:
    from medseg.inference.acceleration import mask_dice
    from medseg.inference.case import CasePredictor

    bundles = {}
    for name in variants:
        start = time.perf_counter()
        bundles[name] = variant_bundle(torch_bundle, name, tmp, calibration)
        print(f"{title}: {name} ready ({time.perf_counter() - start:.1f} s)", flush=True)
    predictor = CasePredictor(torch_bundle)
    image = predictor.prepare(case).data["image"]
    stacks = [x.contiguous() for x in forward_stacks(torch_bundle, image, predictor.ras_axis + 1)]
    rows = {name: {"volume": title, "variant": name, "seconds": [], "forward": [], "peak_rss_mb": 0.0} for name in variants}
    masks: dict[str, np.ndarray] = {}
    for name in variants:  # warm-up (first calls compile / allocate)
        masks[name] = run_case(bundles[name], case)
    for _ in range(repeats):
        for name in variants:
            seconds, rss, _ = measured(lambda n=name: run_case(bundles[n], case))
            rows[name]["seconds"].append(seconds)
            rows[name]["peak_rss_mb"] = max(rows[name]["peak_rss_mb"], rss)
            rows[name]["forward"].append(measured(lambda n=name: run_forward(bundles[n], stacks))[0])
    reference = rows["torch-fp32"] if "torch-fp32" in rows else None
    out = []
    for name, row in rows.items():
        best, forward = min(row["seconds"]), min(row["forward"])
        row.update({"best_s": round(best, 3), "forward_best_s": round(forward, 3), "load_1min": os.getloadavg()[0],
                    "ratio_to_forward": round(best / forward, 3),
                    "ratio_to_torch_fp32": round(min(reference["seconds"]) / best, 3) if reference else None,
                    "dice_vs_torch_fp32": round(mask_dice(masks["torch-fp32"], masks[name]), 5)
                    if "torch-fp32" in masks else None})  # fmt: skip
        out.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("seconds", "forward")}), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(REPO / "runs" / "qc_brats" / "model"), help="model folder")
    parser.add_argument("--fold", type=int, default=0, help="which fold model (fold_<k>.pt) to time")
    parser.add_argument("--manifest", default=str(REPO / "runs" / "qc_brats" / "import" / "manifest.csv"),
                        help="the pool manifest (BraTS case and calibration cases)")  # fmt: skip
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated <backend>-<precision>")
    parser.add_argument("--ct-slices", type=int, default=200)
    parser.add_argument("--ct-train-steps", type=int, default=1200)
    parser.add_argument("--ct-model-cache", default=str(REPO / "runs" / "bench" / "ct_models"))
    parser.add_argument("--skip-ct", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="threads of every variant (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from medseg.auto.folds import read_folds
    from medseg.auto.model_folder import read_model_folder
    from medseg.config import ModelConfig
    from medseg.inference import backends
    from medseg.inference.bundle import InferenceBundle, load_bundle
    from medseg.inference.cases import cases_from_manifest
    from medseg.inference.predictor import prepare_models

    variants = [v for v in args.variants.split(",") if v]
    skipped = [v for v in variants if v.split("-")[0] != "torch" and not backends.backend_available(v.split("-")[0])]
    from medseg.runtime import cpu_has_fast_bf16

    if not cpu_has_fast_bf16():
        skipped += [v for v in variants if v.endswith("-bf16")]
    for v in skipped:
        print(f"skipping {v}: its backend is not installed or this CPU has no fast bf16", flush=True)
    variants = [v for v in variants if v not in skipped]
    if "torch-fp32" not in variants:
        variants.insert(0, "torch-fp32")
    folder = read_model_folder(args.model)
    ckpt = next(p for p in folder.checkpoints if p.stem == f"fold_{args.fold}")
    settings = {**folder.postprocess, "precision": "fp32", "cascade": False, "write_lesions": False,
                "threads": args.threads}  # fmt: skip
    bundle = load_bundle([ckpt], device="cpu", settings=settings)
    folds = read_folds(Path(args.model) / str(folder.record.get("folds")))
    held = set(folds.patients[args.fold])
    cases = cases_from_manifest(args.manifest, bundle.channels, bundle.modality)
    case = next(c for c in cases if c.case_id in held)  # a held-out patient of this fold
    train = [c for c in cases if c.case_id not in held][:2]
    results: dict = {"cpu": backends.cpu_name(), "threads": backends.inference_threads(args.threads),
                     "versions": {b: backends.library_versions(b) for b in backends.BACKENDS if backends.backend_available(b)},
                     "load_at_start": os.getloadavg(), "model": str(ckpt), "case": case.case_id}  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="medseg-bench-backends-") as tmp_name:
        tmp = Path(tmp_name)
        calibration = [s for c in train for s in calibration_from(bundle, c, 16)]
        rows += bench(f"brats {case.case_id}", bundle, case, calibration, variants, args.repeats, tmp)
        if not args.skip_ct:
            from medseg.inference.cases import InferenceCase

            ct_path, _ = synthetic_ct(tmp / "ct.nii.gz", (512, 512, args.ct_slices))
            calib_path, _ = synthetic_ct(tmp / "ct_calib.nii.gz", (512, 512, 32), seed=11)
            context = bundle.config.preprocess.context_slices
            ct_cfg = ModelConfig.model_validate({**bundle.config.model.model_dump(), "in_channels": 2 * context + 1})
            cache = Path(args.ct_model_cache) if args.ct_model_cache else None
            ct_model = cached_ct_model(ct_cfg, bundle.config.preprocess, args.ct_train_steps, tmp, torch.device("cpu"), cache)
            prepare_models([ct_model], "cpu", bundle.inference.channels_last)
            ct_bundle = InferenceBundle([ct_model], bundle.config.model_copy(update={"model": ct_cfg}), ["ct"], "CT", [],
                                        torch.device("cpu"))  # fmt: skip
            ct_calibration = calibration_from(ct_bundle, InferenceCase("calib", {"ct": calib_path}), 32)
            rows += bench(f"ct 512x512x{args.ct_slices} (synthetic)", ct_bundle, InferenceCase("ct", {"ct": ct_path}),
                          ct_calibration, variants, args.repeats, tmp)  # fmt: skip
    results["rows"] = rows
    print(f"\nCPU {results['cpu']}, {results['threads']} thread(s), load at start {results['load_at_start']}")
    print("| volume | variant | s/case | vs torch fp32 | forward alone s | ratio to forward | Dice vs torch fp32 | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['volume']} | {r['variant']} | {r['best_s']:.2f} | {r['ratio_to_torch_fp32']:.2f}x | "
              f"{r['forward_best_s']:.2f} | {r['ratio_to_forward']:.2f}x | {r['dice_vs_torch_fp32']:.4f} | {r['peak_rss_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
