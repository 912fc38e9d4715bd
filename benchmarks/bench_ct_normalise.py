"""CT normalisation: medseg's ``NormalizeCTd`` vs MONAI's ``ScaleIntensityRanged(clip=True)``.

Both clip a CT volume to a HU window and scale it to [0, 1]; the benchmark checks that they
give the same values and prints the time ratio (MONAI / medseg), the reason medseg keeps its
own transform (in-place clamp/sub/div on one float32 copy, no MetaTensor tracking per op).

    .venv/bin/python benchmarks/bench_ct_normalise.py [--shape 512 512 120] [--rounds 3]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRanged
from timing import best_of

from medseg.transforms.preprocessing import NormalizeCTd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 120])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    volume = MetaTensor(torch.randn(1, *args.shape) * 500, affine=torch.eye(4))
    data = {"image": volume}
    ours = NormalizeCTd(["image"], (-100.0, 200.0))
    monai = ScaleIntensityRanged(["image"], -100.0, 200.0, 0.0, 1.0, clip=True, dtype=np.float32)
    diff = float((ours(dict(data))["image"].as_tensor() - monai(dict(data))["image"].as_tensor()).abs().max())
    best_of(lambda: ours(dict(data)), 1), best_of(lambda: monai(dict(data)), 1)  # warm-up
    t_ours, t_monai = best_of(lambda: ours(dict(data)), args.rounds), best_of(lambda: monai(dict(data)), args.rounds)
    print(f"volume {tuple(args.shape)}, {args.threads} thread(s): NormalizeCTd {t_ours * 1000:.0f} ms, "
          f"ScaleIntensityRanged(clip=True) {t_monai * 1000:.0f} ms, ratio MONAI/medseg {t_monai / t_ours:.2f}, "
          f"max |difference| {diff:.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
