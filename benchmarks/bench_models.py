"""CPU forward throughput of the default models, fp32 and bf16 autocast, as ratios to in-process baselines.

Every model runs in eval mode under ``torch.no_grad()`` on a ``(batch, 3, 256, 256)`` input, in
rounds that interleave the models and precisions (one forward pass each per round): ``--warmup``
untimed rounds, then ``--iters`` timed ones; the median time per model and precision is reported. Ratios:
``vs baseline`` = this model's slices/s over the baseline model's (the first listed, plain
``unet``/``unet`` by default) at the same precision; ``bf16/fp32`` = the same model's bf16
autocast throughput over its fp32 one.

    .venv/bin/python benchmarks/bench_models.py
    .venv/bin/python benchmarks/bench_models.py --models unet/unet deeplabv3plus/xception --iters 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from medseg.config import ModelConfig
from medseg.models import build_model
from medseg.models.complexity import count_gflops

# baseline first: the classic U-Net; then each architecture with the config's default encoder
DEFAULT_MODELS = ["unet/unet", "unet/resnet34", "unet_inception/resnet34", "deeplabv3plus/resnet34"]
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def time_forward(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> float:
    """Seconds for one ``model(x)`` in eval mode under no_grad (and bf16 autocast when ``dtype``)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=DEFAULT_MODELS, help="arch/encoder pairs, baseline first"
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        f"input: ({args.batch}, 3, {args.size}, {args.size}), {args.warmup} warm-up + {args.iters} timed rounds"
    )
    x = torch.randn(args.batch, 3, args.size, args.size)
    models, gflops = {}, {}
    for name in args.models:
        arch, encoder = name.split("/")
        models[name] = build_model(ModelConfig(arch=arch, encoder=encoder, in_channels=3)).eval()
        gflops[name] = count_gflops(models[name], 3, args.size, args.size)
    # rounds interleave the models, so that load from other processes hits them alike
    times: dict[str, dict[str, list[float]]] = {n: {d: [] for d in args.dtypes} for n in models}
    for r in range(args.warmup + args.iters):
        for name, model in models.items():
            for d in args.dtypes:
                seconds = time_forward(model, x, DTYPES[d])
                if r >= args.warmup:
                    times[name][d].append(seconds)
        print(
            f"  round {r + 1}/{args.warmup + args.iters} done ({'warm-up' if r < args.warmup else 'timed'})",
            flush=True,
        )
    results = {n: {d: args.batch / statistics.median(t) for d, t in per.items()} for n, per in times.items()}
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    base = args.models[0]
    header = ["model", "GFLOPs/slice"] + [f"{d} slices/s" for d in args.dtypes]
    header += [f"{d} vs {base}" for d in args.dtypes]
    if {"fp32", "bf16"} <= set(args.dtypes):
        header.append("bf16/fp32")
    print()
    print("| " + " | ".join(header) + " |")
    print("|---" + "|---:" * (len(header) - 1) + "|")
    for name, r in results.items():
        cells = [name, f"{gflops[name]:.1f}"] + [f"{r[d]:.2f}" for d in args.dtypes]
        cells += [f"{r[d] / results[base][d]:.2f}x" for d in args.dtypes]
        if {"fp32", "bf16"} <= set(args.dtypes):
            cells.append(f"{r['bf16'] / r['fp32']:.2f}x")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
