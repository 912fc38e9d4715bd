"""Lesion instances: Mask R-CNN against a dense U-Net's connected components, on phantoms whose
lesions include touching pairs (one connected component, two lesions) with instance-labelled
references.

Both models train with the same data, augmentation, patch and **the same CPU time budget**
(``--minutes`` each, ``train.max_minutes``), then ``medseg infer`` writes their outputs and
``medseg evaluate`` (``data.labels.instances: values``: the reference's lesions are its label
values) scores them: voxel Dice, lesion precision/recall/F1 and AP at IoU 0.1-0.5. Printed: one
row per model and the ratios of Mask R-CNN's numbers to the U-Net's (same process, same data).

    .venv/bin/python benchmarks/bench_instances.py --minutes 10 --out /tmp/bench_instances

Results are recorded in docs/benchmarks.md ("Lesion instances: Mask R-CNN vs U-Net components").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from medseg.config import Config
from medseg.engine import train
from medseg.evaluation import evaluate
from medseg.synth import generate_dataset

MODELS = {
    "maskrcnn": {"arch": "maskrcnn", "encoder": "resnet18", "width": 0.5},
    "unet_inception": {"arch": "unet_inception", "encoder": "resnet18", "width": 0.5},
}


def config(manifest: Path, cache: Path, model: dict, minutes: float) -> Config:
    return Config.model_validate({
        "data": {"manifest": str(manifest), "labels": {"instances": "values"}},
        "preprocess": {"context_slices": 1},
        "model": {**model, "in_channels": 6},
        "train": {"epochs": 100, "samples_per_epoch": 400, "batch_size": 8, "patch_size": [96, 96],
                  "num_workers": 0, "amp": "off", "cache_dir": str(cache), "max_minutes": minutes,
                  "optimizer": {"lr": 0.002}, "schedule": {"warmup_epochs": 0.5}, "patience": None},
        "inference": {"threshold": 0.5},
    })  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per model (CPU minutes)")
    parser.add_argument("--cases", type=int, default=16)
    args = parser.parse_args()
    manifest = generate_dataset(args.out / "data", args.cases, shape=(96, 96, 24), seed=7, val_fraction=0.0,
                                test_fraction=0.25, touching_pairs=2, instance_labels=True)
    rows = {}
    for name, model in MODELS.items():
        cfg = config(manifest, args.out / "cache", model, args.minutes)
        run = args.out / name
        start = time.perf_counter()
        result = train(cfg, run / "train", progress=False)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "medseg", "infer", "--checkpoint", str(run / "train" / "last.pt"),
                        "--manifest", str(manifest), "--split", "test", "--out", str(run / "pred"), "--no-progress",
                        "--set", "inference.precision=fp32"], check=True)  # fmt: skip
        infer_s = time.perf_counter() - start
        summary = evaluate(run / "pred", manifest, run / "eval", cfg, progress=False)
        region = summary["per_region"]["lesion"]
        pooled = region["lesion"]["pooled"]
        rows[name] = {
            "epochs": result.epochs_done, "train_min": train_s / 60, "infer_s": infer_s,
            "dice": region["voxel"]["dice"]["mean"], "n_ref": pooled["n_ref"], "n_pred": pooled["n_pred"],
            "precision": pooled["precision"], "recall": pooled["recall"], "f1": pooled["f1"],
            "ap50": region["detection"]["ap"]["0.5"], "map": summary["map"]["mean_over_thresholds"],
            "score_source": summary["score_source"],
        }  # fmt: skip
    print(json.dumps(rows, indent=1))
    keys = ["epochs", "train_min", "infer_s", "dice", "n_ref", "n_pred", "precision", "recall", "f1", "ap50", "map"]
    print("| model | " + " | ".join(keys) + " | score source |")
    print("|---" * (len(keys) + 2) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3g}" for k in keys) + f" | {row['score_source']} |")
    base, mrc = rows["unet_inception"], rows["maskrcnn"]
    for k in ("dice", "f1", "ap50", "map", "infer_s"):
        print(f"maskrcnn / unet_inception {k}: {mrc[k] / base[k]:.2f}" if base[k] else f"{k}: baseline 0")
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
