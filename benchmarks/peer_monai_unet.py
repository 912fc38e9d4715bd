"""The plain MONAI 2D U-Net a user would write, beside medseg: same patients, folds and budget.

    .venv/bin/python benchmarks/peer_monai_unet.py --run runs/qc_brats --work /tmp/monai_peer \
        --out runs/peer_brats/peer_monai_unet.md [--minutes-per-fold 4] [--threads 1]

What the baseline is (deliberately plain, MONAI's building blocks, no medseg training code):
each channel z-scored over its non-zero voxels, 2D slices along the array's last axis (axial for
BraTS), the channels stacked (no context slices), half the batch from slices holding lesion,
random 160 x 192 crops (padded where smaller) and flips, ``monai.networks.nets.UNet`` (2D,
channels 16-256, 2 residual units), ``DiceCELoss`` (sigmoid), Adam at 1e-3, batch 8, fp32,
trained until the fold's wall-clock budget is spent. Prediction: every slice whole (padded to a
multiple of 16), sigmoid > 0.5, written on the source grid (``medseg.io.write_mask``). Scored
with medseg's out-of-fold evaluation (``evaluate_oof``) and compared with medseg's table of the
run (``medseg.comparison``: paired per-patient differences, 95 % patient-bootstrap intervals).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from medseg.auto.cross_validation import evaluate_oof
from medseg.comparison import compare_runs, display_tables, markdown_table, read_run
from medseg.io import read_volume, write_mask
from medseg.labels import read_label
from medseg.outputs import mask_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_nnunet import METRICS, resolve_run  # noqa: E402

CROP = (160, 192)
BATCH = 8


def load_case(case, channels, labels_cfg) -> tuple[np.ndarray, np.ndarray | None, object]:
    """(C, I, J, K) float32 z-scored channels, (I, J, K) 0/1 label or None, the first volume."""
    volumes = [read_volume(case.images[ch]) for ch in channels]
    image = np.stack([v.array.astype(np.float32) for v in volumes])
    for c in range(image.shape[0]):
        nonzero = image[c] != 0
        if nonzero.any():
            mean, std = image[c][nonzero].mean(), image[c][nonzero].std() + 1e-8
            image[c] = np.where(nonzero, (image[c] - mean) / std, 0.0)
    label = read_label(case.label, labels_cfg).array.astype(np.float32) if case.label else None
    return image, label, volumes[0]


def crop_pad(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random CROP-sized window of one slice ((C, H, W), (H, W)), zero-padded where smaller."""
    pad = [(0, 0)] + [(0, max(0, size - n)) for size, n in zip(CROP, image.shape[1:], strict=True)]
    image, label = np.pad(image, pad), np.pad(label, pad[1:])
    y0 = rng.integers(0, image.shape[1] - CROP[0] + 1)
    x0 = rng.integers(0, image.shape[2] - CROP[1] + 1)
    image, label = image[:, y0:y0 + CROP[0], x0:x0 + CROP[1]], label[y0:y0 + CROP[0], x0:x0 + CROP[1]]
    for axis in (1, 2):
        if rng.random() < 0.5:
            image, label = np.flip(image, axis), np.flip(label, axis - 1)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def train(data, seconds: float, seed: int) -> tuple[torch.nn.Module, int]:
    """Train until ``seconds`` of wall time are spent; returns the model and the iterations."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = UNet(spatial_dims=2, in_channels=data[0][0].shape[0], out_channels=1, channels=(16, 32, 64, 128, 256),
                 strides=(2, 2, 2, 2), num_res_units=2)
    loss_fn, optim = DiceCELoss(sigmoid=True), torch.optim.Adam(model.parameters(), lr=1e-3)
    lesion_slices = [(i, k) for i, (_, lab) in enumerate(data) for k in np.flatnonzero(lab.any(axis=(0, 1)))]
    all_slices = [(i, k) for i, (img, _) in enumerate(data) for k in range(img.shape[3])]
    start, iterations = time.perf_counter(), 0
    model.train()
    while time.perf_counter() - start < seconds:
        picks = [lesion_slices[rng.integers(len(lesion_slices))] if b < BATCH // 2 else all_slices[rng.integers(len(all_slices))]
                 for b in range(BATCH)]  # fmt: skip
        pairs = [crop_pad(data[i][0][..., k], data[i][1][..., k], rng) for i, k in picks]
        x = torch.from_numpy(np.stack([p[0] for p in pairs]))
        y = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
        optim.zero_grad()
        loss_fn(model(x), y).backward()
        optim.step()
        iterations += 1
    return model.eval(), iterations


@torch.no_grad()
def predict(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """(I, J, K) 0/1 mask: each slice along K whole, padded to a multiple of 16."""
    _, h, w, depth = image.shape
    ph, pw = -h % 16, -w % 16
    out = np.zeros((h, w, depth), dtype=np.uint8)
    for k in range(depth):
        x = torch.from_numpy(np.pad(image[..., k], [(0, 0), (0, ph), (0, pw)]))[None]
        out[..., k] = (torch.sigmoid(model(x))[0, 0, :h, :w] > 0.5).numpy()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes-per-fold", type=float)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--medseg-table", choices=["chosen", "raw"], default="chosen")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    inputs = resolve_run(args.run, args.minutes_per_fold, args.medseg_table)
    channels = list(inputs.cases[0].channels)
    by_id = {c.case_id: c for c in inputs.cases}
    masks = args.work / "masks"
    masks.mkdir(parents=True, exist_ok=True)
    rows = []
    for fold in range(inputs.folds.n_folds):
        train_cases, held_out = inputs.folds.split([c for c in inputs.cases if c.case_id in inputs.folds.case_ids], fold)
        data = [load_case(c, channels, inputs.cfg.data.labels)[:2] for c in train_cases]
        model, iterations = train(data, inputs.minutes * 60, seed=fold)
        start = time.perf_counter()
        for case in held_out:
            image, _, reference = load_case(by_id[case.case_id], channels, inputs.cfg.data.labels)
            write_mask(predict(model, image), reference, mask_file(masks, case.case_id))
        per_case = (time.perf_counter() - start) / max(len(held_out), 1)
        rows.append({"fold": fold, "train s": round(inputs.minutes * 60), "iterations": iterations,
                     "s/iteration": round(inputs.minutes * 60 / max(iterations, 1), 3), "infer s/case": round(per_case, 1)})
        print(f"fold {fold}: {iterations} iterations in {inputs.minutes:g} min, {per_case:.1f} s per held-out case", flush=True)
    evaluate_oof(inputs.cfg, args.work, inputs.folds, inputs.cases, "cpu", progress=False, pred_dir=masks)
    baseline, medseg = read_run(args.work, label="MONAI 2D U-Net"), read_run(inputs.medseg_table, label="medseg")
    comparison = compare_runs([baseline, medseg], list(METRICS))
    import pandas as pd

    lines = ["# Plain MONAI 2D U-Net beside medseg (same folds, same budget)", "",
             f"- run {args.run}: budget {inputs.minutes:g} min per fold ({inputs.minutes_source}); torch threads "
             f"{args.threads}; medseg table {inputs.medseg_table_note}", "",
             "## Per fold", "", markdown_table(pd.DataFrame(rows)), ""]  # fmt: skip
    for title, frame in display_tables(comparison).items():
        lines += [f"## {title}", "", markdown_table(frame), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines + [f"- {n}" for n in comparison.notes]) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
