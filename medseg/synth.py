"""Synthetic CT and MR phantoms with a known number of ellipsoid lesions.

Each phantom is a body ellipsoid that spans part of the slice axis (so the foreground extent
differs from the volume), an organ inside it (liver-like for CT, brain-like for MR), and
``n_lesions`` non-touching ellipsoid lesions of varied size inside the organ (plus, with
``touching_pairs``, pairs of lesions that touch face to face: one connected component, two
lesions, each with its own intensity, as confluent lesions are). Grids are
anisotropic and cycle through three storage orientations: RAS, LPS and oblique (rotated),
so every consumer is exercised on non-identity affines.

Arrays are built in voxel index order (I, J, K) and written with ``medseg.io.write_volume``.
CT intensities are Hounsfield units (int16); MR has two channels, ``flair`` (lesions bright)
and ``t1`` (lesions dark), with a smooth bias field and Rician-like noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medseg.io import Geometry, write_volume
from medseg.manifest import Case, assign_patient_splits, write_manifest
from medseg.outputs import label_file

ORIENTATIONS = ("ras", "lps", "oblique")

# peak memory of :func:`make_phantom` per voxel (MR, the larger: float64 working arrays, two
# channels; measured with tracemalloc at about 115 bytes), and the largest volume generated at all
PHANTOM_BYTES_PER_VOXEL = 120
MAX_PHANTOM_VOXELS = 1 << 27  # 512 x 512 x 512


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_request(n_cases: int, shape: tuple[int, ...], modality: str = "MR", touching_pairs: int = 0) -> None:
    """Refuse a request :func:`generate_dataset` cannot fulfil, before anything is allocated or
    written: ``n_cases`` < 1, a dimension < 2, negative ``touching_pairs``, or a volume larger than
    :data:`MAX_PHANTOM_VOXELS` or than the available memory can hold while it is built."""
    from medseg.errors import ConfigError

    if n_cases < 1:
        raise ConfigError(f"--n {n_cases}: the number of cases must be at least 1")
    if len(shape) != 3 or min(shape) < 2:
        raise ConfigError(f"--shape {' '.join(map(str, shape))}: three sizes (I J K), each at least 2")
    if touching_pairs < 0:
        raise ConfigError(f"--touching-pairs {touching_pairs}: must be 0 or more")
    if modality.upper() not in ("CT", "MR"):
        raise ConfigError(f"--modality {modality!r}: must be CT or MR")
    voxels = int(np.prod([int(v) for v in shape], dtype=object))
    need = voxels * PHANTOM_BYTES_PER_VOXEL
    available = _available_memory()
    if voxels > MAX_PHANTOM_VOXELS or (available is not None and need > available):
        have = f", {available / 2**30:.1f} GiB are available" if available is not None else ""
        raise ConfigError(
            f"--shape {' '.join(map(str, shape))}: {voxels:,} voxels per volume need about {need / 2**30:.1f} GiB of "
            f"memory to generate{have}; at most {MAX_PHANTOM_VOXELS:,} voxels (e.g. 512 512 512) and what memory "
            "holds -- choose a smaller shape"
        )


@dataclass
class Phantom:
    """One synthetic case: channel arrays and label (I, J, K), RAS affine, lesion truth."""

    images: dict[str, np.ndarray]
    label: np.ndarray
    affine: np.ndarray
    orientation: str
    lesions: list[dict] = field(default_factory=list)
    instances: np.ndarray | None = None  # (I, J, K) uint8 lesion ids 1..N in placement order


def phantom_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float], orientation: str, rng: np.random.Generator) -> np.ndarray:
    """RAS affine for a grid centred on the world origin, in the given storage orientation."""
    if orientation == "ras":
        rot = np.eye(3)
    elif orientation == "lps":
        rot = np.diag([-1.0, -1.0, 1.0])
    elif orientation == "oblique":
        angles = rng.uniform(10, 25, size=3) * rng.choice([-1, 1], size=3)
        rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    else:
        raise ValueError(f"unknown orientation {orientation!r}; valid: {list(ORIENTATIONS)}")
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    centre = (np.asarray(shape) - 1) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def _ellipsoid(shape: tuple[int, ...], centre_vox: np.ndarray, radii_vox: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """Boolean ellipsoid inside its bounding box; returns (box, mask of the box)."""
    lo = np.maximum(np.floor(centre_vox - radii_vox).astype(int), 0)
    hi = np.minimum(np.ceil(centre_vox + radii_vox).astype(int) + 1, shape)
    grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
    dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre_vox, radii_vox, strict=True))
    return tuple(slice(a, b) for a, b in zip(lo, hi, strict=True)), dist <= 1.0


def make_phantom(
    rng: np.random.Generator,
    modality: str = "MR",
    shape: tuple[int, int, int] = (128, 128, 40),
    spacing: tuple[float, float, float] = (1.2, 1.2, 3.0),
    orientation: str = "ras",
    n_lesions: int = 3,
    touching_pairs: int = 0,
) -> Phantom:
    """Build one phantom. Lesion radii are 2.5-14 mm; lesions are >= 2 voxels apart, except the
    ``touching_pairs`` pairs: the second lesion of a pair is placed beside the first along an
    in-plane axis, overlapping it by about a voxel (it keeps only the voxels the first does not
    have), so the two share a face. Lesion intensities then vary per lesion (MR FLAIR 480-720,
    a pair at least 120 apart), otherwise they are fixed per modality as before."""
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    sp = np.asarray(spacing, dtype=np.float64)
    size_mm = np.asarray(shape) * sp
    centre = (np.asarray(shape) - 1) / 2.0
    # body: wide in-plane, covering ~75% of the slice axis (so foreground extent < volume)
    body_radii = np.array([0.45, 0.40, 0.36]) * size_mm / sp * rng.uniform(0.92, 1.0, 3)
    body_box, body_mask = _ellipsoid(shape, centre + rng.normal(0, 1.0, 3), body_radii)
    body = np.zeros(shape, dtype=bool)
    body[body_box] = body_mask
    organ_radii = body_radii * np.array([0.8, 0.75, 0.85])
    organ_centre = centre + rng.normal(0, 1.0, 3)
    organ_box, organ_mask = _ellipsoid(shape, organ_centre, organ_radii)
    organ = np.zeros(shape, dtype=bool)
    organ[organ_box] = organ_mask
    organ &= body

    label = np.zeros(shape, dtype=np.uint8)
    occupied = np.zeros(shape, dtype=bool)
    lesions: list[dict] = []
    attempts = 0
    total = n_lesions + 2 * touching_pairs
    pairs_left = touching_pairs
    while len(lesions) < total and attempts < 500:
        attempts += 1
        radii_mm = rng.uniform(2.5, 14.0) * rng.uniform(0.7, 1.3, 3)
        radii_vox = np.maximum(radii_mm / sp, 0.8)
        c = organ_centre + rng.uniform(-0.7, 0.7, 3) * np.maximum(organ_radii - radii_vox, 0)
        box, mask = _ellipsoid(shape, c, radii_vox)
        if mask.sum() < 4 or not organ[box][mask].all():
            continue
        grown = ndimage.binary_dilation(mask, iterations=2)
        big_box = tuple(slice(max(s.start - 2, 0), min(s.stop + 2, n)) for s, n in zip(box, shape, strict=True))
        region = np.zeros(shape, dtype=bool)
        region[box] = mask
        if (ndimage.binary_dilation(region[big_box], iterations=2) & occupied[big_box]).any():
            continue
        del grown
        if pairs_left:  # a partner beside this lesion, sharing a face with it
            axis = int(rng.integers(0, 2))
            partner_mm = rng.uniform(4.0, 10.0) * rng.uniform(0.8, 1.2, 3)
            partner_vox = np.maximum(partner_mm / sp, 0.8)
            pc = c.copy()
            pc[axis] += (radii_vox[axis] + partner_vox[axis] - 1.0) * rng.choice([-1.0, 1.0])
            pbox, pmask = _ellipsoid(shape, pc, partner_vox)
            partner = np.zeros(shape, dtype=bool)
            partner[pbox] = pmask
            partner &= ~region
            both = region | partner
            if partner.sum() < 8 or not organ[both].all() or (ndimage.binary_dilation(both, iterations=2) & occupied).any():
                continue
            occupied |= both
            label[box][mask] = len(lesions) + 1
            label[partner] = len(lesions) + 2
            lesions.append({"centre_vox": c.round(2).tolist(), "radii_mm": radii_mm.round(2).tolist(),
                            "voxels": int(mask.sum()), "touches": len(lesions) + 2})
            lesions.append({"centre_vox": pc.round(2).tolist(), "radii_mm": partner_mm.round(2).tolist(),
                            "voxels": int(partner.sum()), "touches": len(lesions)})
            pairs_left -= 1
            continue
        if len(lesions) >= total - 2 * pairs_left:
            continue  # room is left for the pairs still to place
        occupied[box] |= mask
        label[box][mask] = len(lesions) + 1
        lesions.append({"centre_vox": c.round(2).tolist(), "radii_mm": radii_mm.round(2).tolist(), "voxels": int(mask.sum())})

    instances = label.copy()
    label = (instances > 0).view(np.uint8)
    # per-lesion FLAIR levels for phantoms with touching pairs (a pair differs by >= 120)
    levels = np.full(len(lesions) + 1, 620.0)
    if touching_pairs:
        for k, info in enumerate(lesions, start=1):
            partner = info.get("touches")
            levels[k] = rng.uniform(480.0, 720.0)
            if partner is not None and partner < k and abs(levels[k] - levels[partner]) < 120.0:
                levels[k] = levels[partner] + (120.0 if levels[partner] < 600.0 else -120.0)
    noise = rng.normal(size=shape)
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    lesion = label.astype(bool)
    if modality.upper() == "CT":
        ct = np.full(shape, -1000.0)
        ct[body] = -80.0 + 30 * smooth[body]  # fat/soft tissue mix
        ct[organ] = 60.0 + 8 * smooth[organ]
        hyper = rng.random() < 0.3
        ct[lesion] = (120.0 if hyper else 25.0) + 8 * smooth[lesion]
        ct += 12.0 * noise
        ct = ndimage.gaussian_filter(ct, 0.6)
        images = {"ct": np.clip(ct, -1024, 3071).round().astype(np.int16)}
    else:
        grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
        bias = 1.0 + 0.15 * (grid[0] * rng.uniform(-1, 1) + grid[1] * rng.uniform(-1, 1))
        flair = np.zeros(shape)
        flair[body] = 150.0
        flair[organ] = 320.0 + 25 * smooth[organ]
        flair[lesion] = levels[instances[lesion]] + 40 * smooth[lesion]
        t1 = np.zeros(shape)
        t1[body] = 250.0
        t1[organ] = 420.0 + 20 * smooth[organ]
        t1[lesion] = 230.0 + 20 * smooth[lesion]
        images = {}
        for name, arr in (("flair", flair), ("t1", t1)):
            arr = ndimage.gaussian_filter(arr * bias, 0.7)
            noisy = np.hypot(arr + 18 * rng.normal(size=shape), 18 * rng.normal(size=shape))  # Rician
            images[name] = noisy.round().astype(np.int16)
    return Phantom(images=images, label=label, affine=phantom_affine(shape, tuple(sp), orientation, rng),  # type: ignore[arg-type]
                   orientation=orientation, lesions=lesions, instances=instances)


def generate_dataset(
    out_dir: str | Path,
    n_cases: int = 12,
    modality: str = "MR",
    shape: tuple[int, int, int] = (128, 128, 40),
    seed: int = 0,
    manifest_path: str | Path | None = None,
    val_fraction: float = 0.25,
    test_fraction: float = 0.25,
    touching_pairs: int = 0,
    instance_labels: bool = False,
) -> Path:
    """Write ``n_cases`` phantoms as NIfTI plus a manifest (default ``out_dir/data_manifest.csv``)
    and ``phantoms.csv`` (truth: lesion count and voxels per case). Returns the manifest path.
    ``touching_pairs``: pairs of touching lesions per case (:func:`make_phantom`);
    ``instance_labels``: label files hold one value per lesion (1..N) instead of 0/1
    (``data.labels.instances: values`` reads them as lesion instances).

    Deterministic for a given seed. Spacing varies per case (anisotropic, 2.5-4 mm slices).
    A request :func:`check_request` refuses raises ``ConfigError`` before any work; a write that
    fails (disk full) raises ``OutputError`` after removing the files this call had added (files
    it replaced stay, complete: every write is verified and atomic).
    """
    check_request(n_cases, shape, modality, touching_pairs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []  # files this call added (not replaced): removed again if it fails
    try:
        return _generate(out, n_cases, modality, shape, seed, manifest_path, val_fraction, test_fraction,
                         touching_pairs, instance_labels, created)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise


def _generate(out: Path, n_cases: int, modality: str, shape: tuple[int, int, int], seed: int,
              manifest_path: str | Path | None, val_fraction: float, test_fraction: float, touching_pairs: int,
              instance_labels: bool, created: list[Path]) -> Path:
    """:func:`generate_dataset`'s work; each file it adds to ``out`` is listed in ``created``."""
    import pandas as pd

    from medseg import atomic

    def write(array: np.ndarray, geometry: Geometry, path: Path, dtype: type) -> Path:
        new = not path.exists()
        write_volume(array, geometry, path, dtype=dtype)
        if new:
            created.append(path)
        return path

    cases: list[Case] = []
    truth: list[dict] = []
    for i in range(n_cases):
        rng = np.random.default_rng([seed, i])
        mod = modality.upper()
        spacing = (round(float(rng.uniform(0.8, 1.3)), 3),) * 2 + (round(float(rng.uniform(2.5, 4.0)), 3),)
        orientation = ORIENTATIONS[i % len(ORIENTATIONS)]
        n_lesions = int(rng.integers(1, 6))
        phantom = make_phantom(rng, mod, shape, spacing, orientation, n_lesions, touching_pairs)  # type: ignore[arg-type]
        case_id = f"phantom_{i:03d}"
        geometry = Geometry.from_affine(phantom.affine, shape)
        images = {}
        for name, arr in phantom.images.items():
            images[name] = write(arr, geometry, out / f"{case_id}_{name}.nii.gz", np.int16)
        label = phantom.instances if instance_labels else phantom.label
        label_path = write(label, geometry, label_file(out, case_id), np.uint8)
        cases.append(Case(case_id, f"patient_{i:03d}", mod, images, label_path, ""))
        truth.append({"case_id": case_id, "modality": mod, "orientation": orientation,
                      "spacing": "x".join(str(s) for s in spacing), "n_lesions": len(phantom.lesions),
                      "lesion_voxels": int(phantom.label.sum())})
    assign_patient_splits(cases, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    truth_path = out / "phantoms.csv"
    new = not truth_path.exists()
    atomic.write_csv(truth_path, pd.DataFrame(truth))
    if new:
        created.append(truth_path)
    return write_manifest(cases, manifest_path or out / "data_manifest.csv")
