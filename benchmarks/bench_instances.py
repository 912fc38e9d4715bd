"""Lesion instances: Mask R-CNN against a dense U-Net's connected components, on phantoms whose
lesions include touching pairs (one connected component, two lesions) with instance-labelled
references.

Both models train with the same data, augmentation, patch and **the same CPU time budget**
(``--minutes`` each, ``train.max_minutes``), then ``medseg infer`` writes their outputs and
``medseg evaluate`` (``data.labels.instances: values``: the reference's lesions are its label
values) scores them: voxel Dice, lesion precision/recall/F1, AP at IoU 0.1-0.5 and how many
touching test pairs come out as two lesions (IoU >= 0.5 each). Mask R-CNN is scored twice: all
its lesions, and with ``inference.min_lesion_score`` chosen where the **training** cases' lesion
F1 peaks. Printed: one row per model and the ratios to the U-Net's numbers (same process, same
data). A rerun reuses trained models found in ``--out``.

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

import numpy as np
import pandas as pd

from medseg.config import Config
from medseg.engine import train
from medseg.evaluation.runner import evaluate
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
        "evaluation": {"split": "test"},
    })  # fmt: skip


def infer(checkpoint: Path, manifest: Path, split: str, out: Path, *settings: str) -> float:
    """``medseg infer`` (fp32) of one split; returns the seconds it took."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "medseg", "infer", "--checkpoint", str(checkpoint), "--manifest", str(manifest),
               "--split", split, "--out", str(out), "--no-progress", "--set", "inference.precision=fp32"]
    for setting in settings:
        command += ["--set", setting]
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def best_min_score(eval_dir: Path, n_ref: int) -> float:
    """The learned-score cut with the best lesion F1 on an evaluated folder: predicted lesions
    scoring below it are dropped. With one-to-one IoU matching, dropping a lesion never changes
    another's match, so F1(t) = 2 TP(t) / (n_pred(t) + n_ref) from ``lesion_matches.csv``."""
    import pandas as pd

    matches = pd.read_csv(eval_dir / "lesion_matches.csv")
    pred = matches[matches.side == "prediction"]
    best, best_f1 = 0.0, -1.0
    for t in sorted(set(pred.score)):
        kept = pred[pred.score >= t]
        f1 = 2 * kept.matched.sum() / (len(kept) + n_ref)
        if f1 > best_f1:
            best, best_f1 = float(t), float(f1)
    return best


def pairs_split(manifest: Path, pred: Path) -> int:
    """Touching reference pairs of the test cases found as two lesions: the instance covering most
    of each member differs, and each has IoU >= 0.5 with its member."""
    from scipy import ndimage

    from medseg.io import read_volume
    from medseg.manifest import read_manifest

    found = 0
    for case in read_manifest(manifest):
        if case.split != "test":
            continue
        ref = read_volume(case.label).array.astype(np.int64)
        inst = read_volume(pred / f"{case.case_id}_lesions.nii.gz").array.astype(np.int64)
        ids = [int(v) for v in np.unique(ref) if v]
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                if not (ndimage.binary_dilation(ref == a) & (ref == b)).any():
                    continue
                best = []
                for member in (ref == a, ref == b):
                    counts = np.bincount(inst[member], minlength=1)
                    counts[0] = 0
                    k = int(counts.argmax())
                    best.append((k, k > 0 and ((inst == k) & member).sum() / ((inst == k) | member).sum() >= 0.5))
                found += int(best[0][0] != best[1][0] and best[0][1] and best[1][1])
    return found


def scores(summary: dict) -> dict:
    region = summary["per_region"]["lesion"]
    pooled = region["lesion"]["pooled"]
    return {
        "dice": region["voxel"]["dice"]["mean"], "n_ref": pooled["n_ref"], "n_pred": pooled["n_pred"],
        "precision": pooled["precision"], "recall": pooled["recall"], "f1": pooled["f1"],
        "ap50": region["detection"]["ap"]["0.5"], "map": summary["map"]["mean_over_thresholds"],
        "score_source": summary["score_source"],
    }  # fmt: skip


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
        checkpoint = run / "train" / "last.pt"
        if not checkpoint.is_file():  # a rerun reuses the trained model (and the complete predictions)
            train(cfg, run / "train", progress=False)
        history = pd.read_csv(run / "train" / "history.csv")
        infer_s = infer(checkpoint, manifest, "test", run / "pred")
        rows[name] = {"epochs": int(history.epoch.iloc[-1]), "train_min": float(history.elapsed_min.iloc[-1]),
                      "infer_s": infer_s, **scores(evaluate(run / "pred", manifest, run / "eval", cfg, progress=False)),
                      "pairs_split": pairs_split(manifest, run / "pred")}
        if name == "maskrcnn":  # the learned-score cut, chosen on the training cases, applied to the test cases
            train_cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"split": "train"})})
            infer(checkpoint, manifest, "train", run / "pred_train")
            on_train = evaluate(run / "pred_train", manifest, run / "eval_train", train_cfg, progress=False)
            cut = best_min_score(run / "eval_train", on_train["per_region"]["lesion"]["lesion"]["pooled"]["n_ref"])
            infer_s = infer(checkpoint, manifest, "test", run / "pred_cut", f"inference.min_lesion_score={cut}")
            summary = evaluate(run / "pred_cut", manifest, run / "eval_cut", cfg, progress=False)
            rows[f"maskrcnn, min_lesion_score {cut:.3f} (chosen on train)"] = {
                **rows[name], "infer_s": infer_s, **scores(summary), "pairs_split": pairs_split(manifest, run / "pred_cut")}
    print(json.dumps(rows, indent=1))
    keys = ["epochs", "train_min", "infer_s", "dice", "n_ref", "n_pred", "precision", "recall", "f1", "ap50", "map",
            "pairs_split"]
    print("| model | " + " | ".join(keys) + " | score source |")
    print("|---" * (len(keys) + 2) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3g}" for k in keys) + f" | {row['score_source']} |")
    base = rows["unet_inception"]
    for name, row in rows.items():
        if name != "unet_inception":
            print(f"{name} / unet_inception: " + ", ".join(f"{k} {row[k] / base[k]:.2f}" for k in ("dice", "f1", "ap50", "map")))
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
