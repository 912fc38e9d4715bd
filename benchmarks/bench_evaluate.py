"""Time ``medseg.evaluation.runner.evaluate`` on the BraTS 2018 cases against reading their files.

Builds a prediction folder in a temporary directory (each case's whole-tumour reference dilated
by one voxel, written on the reference grid), then times, in this process:

- baseline: ``medseg.io.read_volume`` of the 24 files evaluation reads (reference + prediction);
- evaluate: the full evaluation (default config: region ``lesion``, HD95/ASSD, lesion matching,
  AP over 5 IoU thresholds, per-slice detection, four output tables).

Prints the best of ``--repeat`` runs of each and their ratio. Usage::

    .venv/bin/python benchmarks/bench_evaluate.py [--data ../shared/data/brats18] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from timing import best_of

from medseg.config import load_config
from medseg.evaluation.runner import evaluate
from medseg.io import read_volume, write_mask

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "brats18"


def build(data: Path, tmp: Path) -> tuple[Path, Path, list[Path]]:
    """Manifest + dilated-prediction folder; returns them and the files evaluation reads."""
    pred = tmp / "pred"
    pred.mkdir()
    rows, files = [], []
    for case_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        case = case_dir.name
        seg = case_dir / f"{case}_seg.nii.gz"
        ref = read_volume(seg)
        mask = ndimage.binary_dilation(np.asarray(ref.array) > 0)
        out = write_mask(mask.astype(np.uint8), ref, pred / f"{case}_mask.nii.gz")
        files += [seg, out]
        rows.append(
            {
                "case_id": case,
                "patient_id": case,
                "modality": "MR",
                "image_flair": str(case_dir / f"{case}_flair.nii.gz"),
                "label": str(seg),
                "split": "test",
            }
        )
    manifest = tmp / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest, pred, files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of BraTS case folders")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"BraTS data not found at {args.data}", file=sys.stderr)
        return 1
    logging.getLogger("medseg.evaluation.runner").setLevel(logging.ERROR)  # "no detection scores" is expected
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        manifest, pred, files = build(args.data, tmp)
        cfg = load_config()

        def read_all() -> None:
            for f in files:
                read_volume(f).array.max()

        def run_evaluate() -> None:
            evaluate(pred, manifest, tmp / "out", cfg, progress=False)

        read_all()  # warm the page cache for both timings
        baseline = best_of(read_all, args.repeat)
        full = best_of(run_evaluate, args.repeat)
        n_cases = len(files) // 2
    print(f"cases: {n_cases}  files read: {len(files)}  repeat: {args.repeat} (best of)")
    print(f"baseline read_volume x{len(files)}: {baseline:.2f} s")
    print(f"evaluate:                  {full:.2f} s  ({full / n_cases:.3f} s/case)")
    print(f"ratio evaluate / read:     {full / baseline:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
