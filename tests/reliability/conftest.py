"""Shared pieces of the reliability suite: the CLI as a subprocess, a tiny phantom dataset, a
tiny untrained checkpoint, and the checks every bad-input test makes.

Every test here starts the CLI as a subprocess (seconds each): the whole folder is marked
``slow`` (``pytest -m "not slow"`` leaves it out while iterating). Each test drives ``python -m medseg.cli`` and checks the exit status (0 all cases ok, 1 some
failed and recorded in ``failures.csv``, 2 nothing ran), the one ``error:`` line on stderr,
that no traceback escapes, and that no temporary file is left behind.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_checkpoint

from medseg.manifest import Case

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "reliability" in item.nodeid:
            item.add_marker(pytest.mark.slow)
CHANNELS = ["flair", "t1"]
HEADER = ["case_id", "patient_id", "modality", "image_flair", "image_t1", "label", "split"]
N_CASES = 3


def run_cli(*args: str | Path, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m medseg.cli ARGS`` with one OpenMP thread and the environment as it is now (the
    test's site secret file, see tests/conftest.py), plus ``env``; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "medseg.cli", *map(str, args)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=timeout,
        check=False,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_refused(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 2 with exactly one ``error:`` line holding every fragment, no traceback; returns the line."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_some_failed(proc: subprocess.CompletedProcess[str]) -> None:
    """Exit 1 (some case failed, the others done), no traceback, no ``error:`` line."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not error_lines(proc.stderr), proc.stderr


def leftovers(folder: Path) -> list[str]:
    """Temporary files (``*.partial*``, ``*.tmp``, hidden files but the output folder's ownership
    marker) anywhere under ``folder``."""
    from medseg.run_folder import OWNER_NAME

    if not folder.exists():
        return []
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*")
        if ".partial" in p.name or p.name.endswith(".tmp") or (p.name.startswith(".") and p.name != OWNER_NAME)
    )


def read_failures(folder: Path) -> dict[str, str]:
    """``failures.csv`` of ``folder`` as {case_id: error}."""
    with (folder / "failures.csv").open(newline="") as fh:
        return {row["case_id"]: row["error"] for row in csv.DictReader(fh)}


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    """A manifest with the dataset's columns (missing keys left empty)."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, HEADER)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: str(row.get(k, "")) for k in HEADER})
    return path


def case_rows(cases: list[Case]) -> list[dict[str, str]]:
    """The dataset's cases as manifest rows with absolute paths (edit them, then ``write_rows``)."""
    return [
        {"case_id": c.case_id, "patient_id": c.patient_id, "modality": c.modality,
         "image_flair": str(c.images["flair"]), "image_t1": str(c.images["t1"]),
         "label": str(c.label) if c.label else "", "split": c.split}
        for c in cases
    ]


@pytest.fixture(scope="session")
def dataset(phantom_manifest) -> list[Case]:
    """Three 32 x 32 x 8 MR phantoms (flair, t1, binary label), one patient each, split test /
    train / val. Read-only: tests write their own manifests and copies."""
    from medseg.manifest import read_manifest

    return read_manifest(phantom_manifest(N_CASES, (32, 32, 8)))


@pytest.fixture
def manifest(tmp_path: Path, dataset: list[Case]) -> Path:
    """The dataset's manifest (absolute paths) in this test's folder."""
    return write_rows(tmp_path / "manifest.csv", case_rows(dataset))


@pytest.fixture
def predictions(tmp_path: Path, dataset: list[Case]) -> Path:
    """A prediction folder holding each reference label as ``<case_id>_mask.nii.gz`` (perfect masks)."""
    import shutil

    folder = tmp_path / "pred"
    folder.mkdir()
    for c in dataset:
        assert c.label is not None
        shutil.copyfile(c.label, folder / f"{c.case_id}_mask.nii.gz")
    return folder


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly initialised (untrained) tiny U-Net checkpoint for the dataset's channels (MR, 3 slices)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", CHANNELS, "MR", inference={"threads": 1})
