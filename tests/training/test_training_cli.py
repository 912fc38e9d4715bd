"""`medseg train`: bad configs fail before training starts; the shipped configs load;
torchrun with two CPU processes (gloo) trains one epoch and writes one checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import manifest_rows, relocated_manifest, write_tiny_config

from medseg.cli import main
from medseg.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def manifest(phantom_manifest) -> Path:
    return phantom_manifest(3, (48, 44, 16), seed=1, val_fraction=0.34, test_fraction=0)


def write_config(path: Path, manifest: Path, cache: Path, **sections) -> Path:
    return write_tiny_config(path, manifest, {"train": {"cache_dir": str(cache)}}, sections)


def test_bad_configs_fail_before_training(manifest, tmp_path, capsys):
    cache = tmp_path / "cache"
    bad = {
        "unknown key": (write_config(tmp_path / "a.yaml", manifest, cache, train={"epochz": 3}), [],
                        ["train.epochz", "unknown key"]),
        "unknown model": (write_config(tmp_path / "b.yaml", manifest, cache, model={"arch": "unet_incepton"}), [],
                          ["unknown arch 'unet_incepton'", "unet_inception"]),
        "missing column": (write_config(tmp_path / "c.yaml", relocated_manifest(manifest, tmp_path / "m.csv", drop=("split",)), cache),
                           [], ["missing column", "split"]),
        "in_channels": (write_config(tmp_path / "d.yaml", manifest, cache, model={"in_channels": 3}), [],
                        ["model.in_channels is 3", "['flair', 't1']", "set model.in_channels: 6"]),
        "override": (write_config(tmp_path / "e.yaml", manifest, cache), ["--set", "preprocess.context_slices=2"],
                     ["model.in_channels is 6", "set model.in_channels: 10"]),
    }  # fmt: skip
    for name, (config, extra, needles) in bad.items():
        out = tmp_path / f"run-{name.replace(' ', '_')}"
        assert main(["train", str(config), "--out", str(out), "--no-progress", *extra]) == 2, name
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, (name, err)
        assert not out.exists() and not cache.exists(), name  # nothing was preprocessed or written


def test_mixed_modalities_are_refused(manifest, tmp_path, capsys):
    frame = manifest_rows(manifest)
    frame.loc[0, "modality"] = "CT"
    mixed = tmp_path / "mixed.csv"
    frame.to_csv(mixed, index=False)
    config = write_config(tmp_path / "mixed.yaml", mixed, tmp_path / "cache")
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "one modality" in capsys.readouterr().err


def test_a_patient_in_train_and_val_is_refused(manifest, tmp_path, capsys):
    frame = manifest_rows(manifest)
    val_patient = frame.loc[frame["split"] == "val", "patient_id"].iloc[0]
    frame.loc[frame["split"] == "train", "patient_id"] = [val_patient] + list(frame.loc[frame["split"] == "train", "patient_id"])[1:]
    leaky = tmp_path / "leaky.csv"
    frame.to_csv(leaky, index=False)
    config = write_config(tmp_path / "leaky.yaml", leaky, tmp_path / "cache")
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is in more than one split" in err and val_patient in err  # refused when the manifest is read


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    n_channels = 2 if path.name == "demo.yaml" else 3  # demo phantoms: flair + t1; BraTS: flair, t1ce, t2
    assert cfg.model.in_channels == n_channels * (2 * cfg.preprocess.context_slices + 1)


def test_torchrun_two_cpu_processes_train_one_epoch(manifest, tmp_path):
    config = write_config(tmp_path / "ddp.yaml", manifest, tmp_path / "cache")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "medseg.cli", "train", str(config),
           "--out", str(out), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1]
    assert "2 rank(s)" in proc.stderr
    from medseg.models.checkpoint import load_checkpoint

    extra = load_checkpoint(out / "last.pt")["extra"]
    assert extra["world_size"] == 2 and len(extra["rng"]) == 2
    # 16 samples over 2 ranks x batches of 4: each rank took 2 steps
    assert extra["global_step"] == 2
