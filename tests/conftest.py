"""Shared fixtures: synthetic NIfTI volumes with non-identity affines, phantom datasets built
once per session (:func:`phantom_manifest`), tiny checkpoints and configs, real-data locations."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
BRATS_DIR = SHARED_DATA / "brats18"
NRRD_DIR = SHARED_DATA / "radiomics_nrrd"


def artifact_path(tmp_path: Path, name: str) -> Path:
    """Where a test keeps a file for people to look at (a screenshot): ``$MEDSEG_TEST_ARTIFACTS/name``
    when that folder is set (e.g. by CI), else in the test's temporary folder -- never in the repository."""
    import os

    folder = Path(os.environ["MEDSEG_TEST_ARTIFACTS"]) if os.environ.get("MEDSEG_TEST_ARTIFACTS") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def make_affine(kind: str, spacing=(0.7, 0.9, 3.2), origin=(-100.3, 20.7, 55.1)) -> np.ndarray:
    """RAS affine of the given storage orientation: ras, lps, oblique or las."""
    rot = {
        "ras": np.eye(3),
        "lps": np.diag([-1.0, -1.0, 1.0]),
        "las": np.diag([-1.0, 1.0, 1.0]),
        "oblique": Rotation.from_euler("xyz", [20, -15, 30], degrees=True).as_matrix(),
    }[kind]
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


GEOMETRIES = ["ras", "lps", "las", "oblique"]


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


@pytest.fixture(autouse=True)
def site_secret_in_tmp(tmp_path_factory, monkeypatch):
    """Pseudonyms use a site secret file under the test's temporary folder, never the user's."""
    monkeypatch.delenv("MEDSEG_SITE_SECRET", raising=False)
    monkeypatch.setenv("MEDSEG_SITE_SECRET_FILE", str(tmp_path_factory.mktemp("secret") / "site_secret"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def requires_brats() -> Path:
    if not BRATS_DIR.is_dir():
        pytest.skip(f"real BraTS data not available at {BRATS_DIR} (only on the team's machines)")
    return BRATS_DIR


@pytest.fixture
def requires_nrrd() -> Path:
    if not NRRD_DIR.is_dir():
        pytest.skip(f"real NRRD data not available at {NRRD_DIR} (only on the team's machines)")
    return NRRD_DIR


@pytest.fixture(scope="session")
def phantom_manifest(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``build(n_cases, shape, seed=0, val_fraction=0.25, test_fraction=0.25, modality="MR",
    touching_pairs=0, instance_labels=False) -> manifest``: :func:`medseg.synth.generate_dataset`'s
    phantoms (channels flair and t1 for MR, ct for CT; (I, J, K) = ``shape``; cases
    ``phantom_000``...; manifest paths relative to its folder), built once per session for each
    distinct set of arguments and shared by every test that asks for the same set.

    Read-only: a test that needs other columns or rows writes its own manifest elsewhere
    (:func:`relocated_manifest`) and its outputs into its own folder, never beside the phantoms.
    """
    from medseg.synth import generate_dataset

    built: dict[tuple, Path] = {}

    def build(n_cases: int, shape: tuple[int, int, int], seed: int = 0, val_fraction: float = 0.25,
              test_fraction: float = 0.25, modality: str = "MR", touching_pairs: int = 0,
              instance_labels: bool = False) -> Path:  # fmt: skip
        key = (n_cases, tuple(shape), seed, val_fraction, test_fraction, modality, touching_pairs, instance_labels)
        if key not in built:
            name = f"phantoms_{modality}_{n_cases}x{'x'.join(map(str, shape))}_s{seed}"
            built[key] = generate_dataset(tmp_path_factory.mktemp(name), n_cases, modality, tuple(shape), seed,
                                          val_fraction=val_fraction, test_fraction=test_fraction,
                                          touching_pairs=touching_pairs, instance_labels=instance_labels)  # fmt: skip
        return built[key]

    return build


def manifest_rows(manifest: Path):
    """``manifest``'s rows as a ``pandas.DataFrame`` of strings (empty cells ""), its file columns
    (``image_*``, ``label``) made absolute: edit them, then write them anywhere (``to_csv``)."""
    import pandas as pd

    rows = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    for column in rows.columns:
        if column.startswith("image_") or column == "label":
            rows[column] = [str((manifest.parent / v).resolve()) if v else "" for v in rows[column]]
    return rows


def relocated_manifest(manifest: Path, path: Path, drop: tuple[str, ...] = (), **columns: object) -> Path:
    """``manifest``'s rows written to ``path`` (another folder) with absolute file paths
    (:func:`manifest_rows`), the columns ``drop`` left out and each of ``columns`` set (one value
    for every row, or a list with one per row; a new name is appended as the last column)."""
    rows = manifest_rows(manifest).drop(columns=list(drop))
    for column, values in columns.items():
        rows[column] = values
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(path, index=False)
    return path


def make_case_files(tmp: Path, case_id: str, affine: np.ndarray, shape=(40, 36, 12), channels=("flair", "t1"),
                    rng: np.random.Generator | None = None) -> dict[str, Path]:
    """Write a small multi-channel case with a two-lesion label; returns paths by role."""
    rng = rng or np.random.default_rng(0)
    out: dict[str, Path] = {}
    for ch in channels:
        arr = (rng.random(shape) * 100 + 50).astype(np.int16)
        arr[:, :, :2] = 0  # empty slices at the bottom: outside the foreground
        out[ch] = write_nifti(tmp / f"{case_id}_{ch}.nii.gz", arr, affine)
    label = np.zeros(shape, dtype=np.uint8)
    label[5:10, 5:9, 4:7] = 1
    label[20:24, 20:25, 8:10] = 1
    out["label"] = write_nifti(tmp / f"{case_id}_seg.nii.gz", label, affine)
    return out


def install_plugin(site: Path, package: str, source: str, entry_points: list[str]) -> Path:
    """A medseg model plug-in installed the way pip leaves it under ``site``: the package
    ``package`` (``__init__.py`` = ``source``) and a dist-info whose ``entry_points.txt`` lists
    ``entry_points`` (``arch.name = module:builder`` lines) in the ``medseg.models`` group.
    Returns ``site``, to put on ``sys.path`` (``monkeypatch.syspath_prepend``) or PYTHONPATH."""
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(source)
    info = site / f"{package}-0.1.dist-info"
    info.mkdir()
    dist = package.replace("_", "-")
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[medseg.models]\n" + "".join(f"{line}\n" for line in entry_points))
    return site



def save_tiny_checkpoint(path: Path, channels: list[str], modality: str = "MR", context: int = 1,
                         out_channels: int = 1, inference: dict | None = None, seed: int = 0,
                         nan_weights: bool = False) -> Path:
    """A freshly initialised (untrained) tiny U-Net checkpoint (width 0.125, ``channels`` x
    ``2 * context + 1`` slices) following the training contract (``extra``: config, channels,
    modality). ``nan_weights``: the first convolution's weights are NaN (a diverged training run)."""
    import torch

    from medseg.config import Config, InferenceConfig, ModelConfig, PreprocessConfig
    from medseg.models import build_model
    from medseg.models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model_cfg = ModelConfig(arch="unet", encoder="unet", in_channels=len(channels) * (2 * context + 1),
                            out_channels=out_channels, width=0.125)
    model = build_model(model_cfg)
    if nan_weights:
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        with torch.no_grad():
            conv.weight.fill_(float("nan"))
    config = Config(model=model_cfg, preprocess=PreprocessConfig(context_slices=context),
                    inference=InferenceConfig(**(inference or {})))
    extra = {"config": config.model_dump(mode="json"), "channels": list(channels), "modality": modality}
    return save_checkpoint(path, model, model_cfg, extra)


TINY_MODEL = {"arch": "unet", "encoder": "unet", "in_channels": 6, "width": 0.125}  # 2 channels x 3 slices
TINY_TRAIN = {"epochs": 1, "samples_per_epoch": 16, "batch_size": 4, "patch_size": [48, 48], "num_workers": 0,
              "threads": 1, "amp": "off"}  # fmt: skip


def write_tiny_config(path: Path, manifest: Path, *updates: dict[str, dict]) -> Path:
    """A tiny training config for two-channel phantoms (:data:`TINY_MODEL`, one short epoch of
    :data:`TINY_TRAIN`) written as YAML; each of ``updates`` (``{section: {key: value}}``) is merged
    in section by section, in order."""
    import yaml

    tree = {"data": {"manifest": str(manifest)}, "model": dict(TINY_MODEL), "train": dict(TINY_TRAIN)}
    for update in updates:
        for name, values in update.items():
            tree.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(tree))
    return path
