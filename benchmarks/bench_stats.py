"""Cost of `medseg stats` against the lower bound of only loading the label volumes.

Writes N synthetic CT-sized cases (512x512x200 label masks with ellipsoid lesions, and a
matching int16 image) to a temporary folder, then times in this process:

1. load-only lower bound: SimpleITK reads every label file (what any tool must pay);
2. medseg stats with ``extent=volume`` (labels only) — goal <= 1.5x the lower bound;
3. medseg stats with ``extent=foreground`` (label + first image channel) vs loading both;
4. a naive per-slice ``skimage.measure.label`` loop over the same labels (loaded with nibabel,
   as a user script would);
and, for the reader choice, the time to read one int16 image with SimpleITK, nibabel and
MONAI's default ``LoadImaged``.

Usage: python benchmarks/bench_stats.py [--n 4] [--shape 512 512 200] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from timing import best_of


def make_cases(folder: Path, n: int, shape: tuple[int, int, int]) -> Path:
    from scipy import ndimage

    from medseg.io import Geometry, write_volume
    from medseg.manifest import Case, write_manifest

    rng = np.random.default_rng(0)
    cases = []
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    geometry = Geometry.from_affine(affine, shape)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    body = sum(((g - s / 2) / (0.45 * s)) ** 2 for g, s in zip(grid, shape, strict=True)) <= 1
    for i in range(n):
        label = np.zeros(shape, np.uint8)
        for _ in range(int(rng.integers(2, 8))):
            c = rng.uniform(0.3, 0.7, 3) * np.asarray(shape)
            r = rng.uniform(4, 25, 3) / np.array([0.7, 0.7, 2.5])
            lo = np.maximum((c - r).astype(int), 0)
            hi = np.minimum((c + r).astype(int) + 1, shape)
            sub = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
            ell = sum(((g - cc) / rr) ** 2 for g, cc, rr in zip(sub, c, r, strict=True)) <= 1
            label[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))][ell] = 1
        image = np.where(body, 40, -1000).astype(np.int16)
        image = (image + ndimage.gaussian_filter(rng.normal(0, 30, shape).astype(np.float32), 1.5)).astype(np.int16)
        image[label > 0] = 90
        img_path = write_volume(image, geometry, folder / f"case{i}_ct.nii.gz", dtype=np.int16)
        lab_path = write_volume(label, geometry, folder / f"case{i}_label.nii.gz")
        cases.append(Case(f"case{i}", f"p{i}", "CT", {"ct": img_path}, lab_path, "train"))
    return write_manifest(cases, folder / "manifest.csv")


def naive_loop(label_paths: list[Path]) -> None:
    import nibabel as nib
    from skimage import measure

    for path in label_paths:
        mask = np.asarray(nib.load(str(path)).dataobj) > 0
        for k in range(mask.shape[2]):
            lab = measure.label(mask[:, :, k], connectivity=2)
            _ = [(r.area, r.bbox) for r in measure.regionprops(lab)]
        measure.label(mask, connectivity=3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    import nibabel as nib
    import SimpleITK as sitk
    from monai.transforms import LoadImaged

    from medseg.config import Config
    from medseg.manifest import read_manifest
    from medseg.stats.dataset import compute_dataset_stats

    with tempfile.TemporaryDirectory(prefix="medseg-bench-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        manifest = make_cases(folder, args.n, tuple(args.shape))
        print(f"made {args.n} cases of {tuple(args.shape)} in {time.perf_counter() - t0:.1f} s")
        cases = read_manifest(manifest)
        labels = [c.label for c in cases]
        images = [c.images["ct"] for c in cases]

        def load_labels():
            for p in labels:
                image = sitk.ReadImage(str(p))  # keep a reference: the view does not own the buffer
                sitk.GetArrayViewFromImage(image).sum(dtype=np.int64)  # touch the data

        def load_both():
            for p in [*labels, *images]:
                image = sitk.ReadImage(str(p))
                sitk.GetArrayViewFromImage(image).max()

        cfg_volume = Config()
        cfg_volume.stats.extent = "volume"
        cfg_fg = Config()

        t_load = best_of(load_labels, args.repeat)
        t_stats = best_of(lambda: compute_dataset_stats(cases, cfg_volume, progress=False), args.repeat)
        t_load2 = best_of(load_both, args.repeat)
        t_stats_fg = best_of(lambda: compute_dataset_stats(cases, cfg_fg, progress=False), args.repeat)
        t_naive = best_of(lambda: naive_loop(labels), 1)

        one = str(images[0])
        t_sitk = best_of(lambda: sitk.GetArrayFromImage(sitk.ReadImage(one)), args.repeat + 1)
        t_nib = best_of(lambda: np.asarray(nib.load(one).dataobj), args.repeat + 1)
        monai_default = LoadImaged(["x"], image_only=True)
        t_monai = best_of(lambda: monai_default({"x": one}), args.repeat + 1)

    per = 1.0 / args.n
    print(f"\nload-only lower bound (labels, SimpleITK): {t_load:.2f} s  ({t_load * per:.3f} s/case)")
    print(f"medseg stats, extent=volume:               {t_stats:.2f} s  ({t_stats * per:.3f} s/case)  ratio {t_stats / t_load:.2f}x")
    print(f"load-only (label + image):                 {t_load2:.2f} s")
    print(f"medseg stats, extent=foreground:           {t_stats_fg:.2f} s  ratio {t_stats_fg / t_load2:.2f}x vs loading both")
    print(f"naive per-slice skimage loop:              {t_naive:.2f} s  ({t_naive * per:.3f} s/case)  "
          f"medseg is {t_naive / t_stats:.1f}x faster")
    print(f"\nreading one int16 image: SimpleITK {t_sitk:.3f} s, nibabel {t_nib:.3f} s ({t_nib / t_sitk:.1f}x), "
          f"MONAI LoadImaged default {t_monai:.3f} s ({t_monai / t_sitk:.1f}x)")
    print(f"\nmachine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
