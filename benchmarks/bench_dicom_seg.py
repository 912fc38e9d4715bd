"""DICOM SEG output cost: ``write_dicom_seg`` (highdicom) vs writing the same mask as NIfTI
(``write_volume``, the baseline every case already pays), on a synthetic CT series.

Prints the time of each and the ratio SEG / NIfTI, plus the SEG's size. The series is written
with pydicom into a temporary folder (512 x 512 x N slices by default, lesions on a fifth of them).

    .venv/bin/python benchmarks/bench_dicom_seg.py [--shape 512 512 120] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dicom_helpers import write_series  # noqa: E402
from timing import best_of  # noqa: E402

from medseg.dicom.seg_writer import write_dicom_seg  # noqa: E402
from medseg.io import Geometry, read_volume, write_volume  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 120])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shape = tuple(args.shape)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="medseg-bench-seg-") as tmp:
        folder = Path(tmp) / "series"
        geometry = Geometry(shape, (0.8, 0.8, 2.5), (-200.0, -200.0, 0.0), tuple(np.eye(3).ravel()))
        write_series(folder, (rng.random(shape) * 1000).astype(np.int16), geometry)
        volume = read_volume(folder)
        mask = np.zeros(shape, np.uint8)
        k0, k1 = shape[2] * 2 // 5, shape[2] * 3 // 5
        mask[shape[0] // 3: shape[0] // 2, shape[1] // 3: shape[1] // 2, k0:k1] = 1
        nifti = best_of(lambda: write_volume(mask, volume.geometry, Path(tmp) / "m.nii.gz", dtype=np.uint8), args.rounds)
        seg = best_of(lambda: write_dicom_seg(mask, volume.geometry, folder, Path(tmp) / "m_seg.dcm"), args.rounds)
        size = (Path(tmp) / "m_seg.dcm").stat().st_size
        print(f"series {shape[0]}x{shape[1]}x{shape[2]}, lesion on {k1 - k0} slices")
        print(f"NIfTI mask (baseline): {nifti * 1000:.0f} ms")
        print(f"DICOM SEG (BINARY):    {seg * 1000:.0f} ms  ({size / 1024:.0f} KiB)")
        print(f"ratio SEG / NIfTI:     {seg / nifti:.2f}x")


if __name__ == "__main__":
    main()
