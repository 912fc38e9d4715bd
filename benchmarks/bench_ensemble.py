"""Cost and effect of the fold ensemble of a model folder against one fold model, in one process.

For each case of a manifest (default: every case), interleaved over ``--rounds`` rounds, times
``CasePredictor.run_case`` end to end (read, preprocess, predict, post-process, write) with

- single: the model folder's ``fold_0.pt`` alone, with the folder's post-processing rule;
- ensemble: every fold model (probabilities averaged), the same rule (what ``medseg infer
  --model`` does);

and prints the best time of each per case, their median ratio (goal: about the number of folds
in the network part, less around it: reading, preprocessing and writing are shared), the
agreement of the ensemble's mask with each fold model's mask (Dice), and, where the manifest has
labels, each one's Dice to the reference. The cross-validation's training cost against one
model's comes from the run's ``cv/fold_*/fold_done.json``.

On the cross-validated cases themselves every fold model but one has trained on the case, so
the Dice to the reference is not an out-of-fold figure there (``cv/cv_table.csv`` is); the
mask agreement and the timings are what this measures. Usage::

    .venv/bin/python benchmarks/bench_ensemble.py --run runs/auto_brats [--rounds 2] [--cases 6]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medseg.auto.model_folder import read_model_folder
from medseg.inference.cases import cases_from_manifest
from medseg.inference.runner import CasePredictor, load_bundle
from medseg.io import read_volume
from medseg.labels import read_label
from medseg.metrics.voxel import voxel_metrics


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return voxel_metrics(a > 0, b > 0, (1.0, 1.0, 1.0), distances=False).dice


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="an auto.yaml run folder (model/, cv/, import/)")
    parser.add_argument("--manifest", type=Path, help="cases to predict (default: the run's import/manifest.csv)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", type=int, default=None, help="only the first N cases")
    args = parser.parse_args(argv)
    logging.getLogger("medseg").setLevel(logging.WARNING)
    folder = read_model_folder(args.run / "model")
    manifest = args.manifest or args.run / "import" / "manifest.csv"
    rule = folder.postprocess
    single = load_bundle(folder.checkpoints[:1], settings=rule)
    ensemble = load_bundle(folder.checkpoints, settings=rule)
    cases = cases_from_manifest(manifest, ensemble.channels, ensemble.modality)[: args.cases]
    from medseg.manifest import read_manifest

    labels = {c.case_id: c.label for c in read_manifest(manifest)}
    fold_bundles = [load_bundle([p], settings=rule) for p in folder.checkpoints]
    print(f"{len(cases)} case(s), {len(folder.checkpoints)} fold models, rule {folder.postprocess}, "
          f"{args.rounds} round(s), device {ensemble.device}")  # fmt: skip
    ratios, agreement, ref_single, ref_ensemble = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            times: dict[str, list[float]] = {"single": [], "ensemble": []}
            for r in range(args.rounds):
                for name, bundle in (("single", single), ("ensemble", ensemble)):
                    out = Path(tmp) / f"{name}_{r}"
                    start = time.perf_counter()
                    CasePredictor(bundle).run_case(case, out)
                    times[name].append(time.perf_counter() - start)
            ens_mask = read_volume(Path(tmp) / "ensemble_0" / f"{case.case_id}_mask.nii.gz").array
            fold_dice = []
            for k, bundle in enumerate(fold_bundles):
                out = Path(tmp) / f"fold_{k}"
                CasePredictor(bundle).run_case(case, out)
                fold_dice.append(dice(read_volume(out / f"{case.case_id}_mask.nii.gz").array, ens_mask))
            single_mask = read_volume(Path(tmp) / "single_0" / f"{case.case_id}_mask.nii.gz").array
            ratio = min(times["ensemble"]) / min(times["single"])
            ratios.append(ratio)
            agreement.append(fold_dice)
            line = (f"{case.case_id}: single {min(times['single']):.2f} s, ensemble {min(times['ensemble']):.2f} s "
                    f"({ratio:.2f}x); ensemble vs fold masks Dice {' '.join(f'{d:.3f}' for d in fold_dice)}")  # fmt: skip
            if labels.get(case.case_id) is not None:
                ref = read_label(labels[case.case_id]).array
                ref_single.append(dice(single_mask, ref))
                ref_ensemble.append(dice(ens_mask, ref))
                line += f"; vs reference: fold 0 {ref_single[-1]:.3f}, ensemble {ref_ensemble[-1]:.3f}"
            print(line, flush=True)
    agreement_arr = np.asarray(agreement)
    print(f"\nensemble / single end to end: median {np.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")
    print(f"ensemble vs single-fold masks: mean Dice {agreement_arr.mean():.4f} "
          f"(per fold {' '.join(f'{v:.4f}' for v in agreement_arr.mean(axis=0))}, min {agreement_arr.min():.4f})")  # fmt: skip
    if ref_single:
        print(f"Dice to the reference (not out-of-fold, see the docstring): fold 0 {np.mean(ref_single):.4f}, "
              f"ensemble {np.mean(ref_ensemble):.4f}")  # fmt: skip
    done = [json.loads(p.read_text()) for p in sorted((args.run / "cv").glob("fold_*/fold_done.json"))]
    if done:
        seconds = [d["seconds"] for d in done]
        print(f"cross-validation training: {len(done)} folds, {sum(seconds) / 60:.1f} min in all, "
              f"{np.mean(seconds) / 60:.1f} min per fold = one single-model training ({len(done)}x the cost on one device)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
