"""The inference allocator policy (``InferenceConfig.keep_freed_memory``, :func:`medseg.runtime.keep_freed_memory`):
the work of one case around the forward pass, with glibc's default allocator vs with the policy.

The policy is process-wide, so each setting runs in its own child process; the two alternate
``--rounds`` times (a slow spell of the shared machine hits both) and each child times
``--repeats`` cases after one warm-up. Timed per case, everything medseg does but the network:
read + preprocess (the checkpoint's chain), the slice-major copy and every 2.5D batch copy of
``predict_volume``, inversion to the source grid, post-processing, lesion table and writing all
outputs (``finish_and_write``) -- on probabilities predicted once before the clock starts.
Printed: per child the best and median seconds and the minor page faults per case; at the end
the ratio of the medians (default / policy).

    .venv/bin/python benchmarks/bench_allocator.py [--checkpoint runs/x/best.pt] [--case Brats18_2013_20_1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BRATS = (REPO / ".." / "shared" / "data" / "brats18").resolve()
DEFAULT_CHECKPOINT = REPO / "runs" / "brats_unet_inception_k2e11" / "best.pt"


def child(checkpoint: Path, case_dir: Path, policy: bool, repeats: int) -> dict:
    """One setting in this process: per-case seconds and page faults of the work around the network."""
    import resource

    import numpy as np
    import torch

    from medseg.inference import predictor as P
    from medseg.inference.cases import InferenceCase
    from medseg.inference.runner import CasePredictor, load_bundle
    from medseg.transforms.preprocessing import IMAGE_KEY

    bundle = load_bundle([checkpoint], [f"inference.keep_freed_memory={str(policy).lower()}"])
    predictor = CasePredictor(bundle)
    case = InferenceCase(case_dir.name, {c: case_dir / f"{case_dir.name}_{c}.nii.gz" for c in bundle.channels})
    axis = predictor.ras_axis + 1
    prob, _ = predictor.probabilities(predictor.prepare(case))
    cfg = bundle.inference
    batch = cfg.batch_size or P.default_batch_size(bundle.device)
    context = bundle.config.preprocess.context_slices

    def around_the_network(out: Path) -> None:
        prepared = predictor.prepare(case)
        image = prepared.data[IMAGE_KEY].as_tensor()
        plane = [s for i, s in enumerate(image.shape[1:], start=1) if i != axis]
        padding = P.window_padding(plane, cfg.roi_size, P.network_stride(bundle.models))
        with torch.inference_mode():
            stacks = P.SliceStacks(image, axis, context, cfg.channels_last, padding)
            for start in range(0, image.shape[axis], batch):
                stacks(start, min(start + batch, image.shape[axis]))
        del stacks
        predictor.finish_and_write(prepared, prob.clone(), 0.0, out, "bench")

    times = []
    with tempfile.TemporaryDirectory() as tmp:
        around_the_network(Path(tmp))  # warm-up
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(repeats):
            start = time.perf_counter()
            around_the_network(Path(tmp))
            times.append(time.perf_counter() - start)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"policy": policy, "best_s": min(times), "median_s": float(np.median(times)), "faults_per_case": faults // repeats}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--case", default="Brats18_2013_20_1", help="BraTS case folder under ../shared/data/brats18")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--child", choices=["default", "policy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    case_dir = BRATS / args.case
    if args.child:
        print(json.dumps(child(args.checkpoint, case_dir, args.child == "policy", args.repeats)))
        return 0
    if not case_dir.is_dir() or not args.checkpoint.is_file():
        print(f"needs {case_dir} and {args.checkpoint}", file=sys.stderr)
        return 2
    results: dict[str, list[dict]] = {"default": [], "policy": []}
    for _ in range(args.rounds):
        for setting in results:
            cmd = [sys.executable, __file__, "--child", setting, "--checkpoint", str(args.checkpoint),
                   "--case", args.case, "--repeats", str(args.repeats)]
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            results[setting].append(row)
            print(f"{setting:8s} best {row['best_s'] * 1000:6.1f} ms  median {row['median_s'] * 1000:6.1f} ms  "
                  f"page faults/case {row['faults_per_case']}", flush=True)
    medians = {k: sorted(r["median_s"] for r in rows)[len(rows) // 2] for k, rows in results.items()}
    print(f"median of medians: default {medians['default'] * 1000:.1f} ms, policy {medians['policy'] * 1000:.1f} ms, "
          f"ratio {medians['default'] / medians['policy']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
