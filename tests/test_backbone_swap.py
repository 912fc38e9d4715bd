"""Swapping the network is one ``--set model.arch=...`` (issue 36, point 1): the built-in
architectures' settings are dropped with one line for a MONAI network or a plug-in, in ``train``
and in a pipeline whose plan writes the config; a built-in mismatch prints the ``--set`` that
fixes it; plug-in builders get ``in_channels`` / ``out_channels``; names show the encoder only
where it is used; ``medseg models --in-channels 6`` works or names the model that cannot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import install_plugin

from medseg.config import ModelConfig, load_config
from medseg.model_names import model_name
from medseg.models.registry import build_model

REPO = Path(__file__).resolve().parents[1]
DROPPED = "model.arch monai:SegResNet: dropped model.decoder_channels, model.dropout, model.width"
TINY_TRAIN = {"epochs": 1, "samples_per_epoch": 8, "batch_size": 4, "patch_size": [48, 48], "num_workers": 0,
              "threads": 1, "amp": "off", "ema_decay": None}  # fmt: skip


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m medseg.cli ARGS`` (one OpenMP thread), output captured as text."""
    return subprocess.run([sys.executable, "-m", "medseg.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def manifest(phantom_manifest) -> Path:
    """Three small two-channel MR phantoms (2 train, 1 val)."""
    return phantom_manifest(3, (48, 44, 12), seed=1, val_fraction=0.34, test_fraction=0)


def builtin_config(path: Path, manifest: Path) -> Path:
    """A config written for a built-in U-Net: width, decoder_channels and dropout set (as configs/demo.yaml)."""
    tree = {"data": {"manifest": str(manifest)},
            "model": {"arch": "unet_inception", "encoder": "resnet18", "in_channels": 6, "width": 0.125,
                      "decoder_channels": [32, 16, 16, 16, 16], "dropout": 0.1},
            "train": {**TINY_TRAIN, "cache_dir": None}}  # fmt: skip
    path.write_text(yaml.safe_dump(tree))
    return path


def test_train_swaps_to_a_monai_network_with_one_set(manifest, tmp_path):
    cfg = builtin_config(tmp_path / "c.yaml", manifest)
    out = tmp_path / "run"
    proc = run_cli("train", cfg, "--out", out, "--no-progress", "--set", "model.arch=monai:SegResNet",
                   "--set", "model.options={init_filters: 8}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "dropped" in line] == [
        f"WARNING medseg.config: {DROPPED} (settings of the built-in architectures; monai:SegResNet takes its own "
        "in model.options)"]
    written = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert written["arch"] == "monai:SegResNet" and written["width"] is None and written["decoder_channels"] is None
    assert (out / "last.pt").is_file()
    # the checkpoint is named without the encoder a MONAI network does not use
    proc = run_cli("export", out / "last.pt", "--format", "inference", "--out", tmp_path / "slim.pt")
    assert proc.returncode == 0, proc.stderr
    assert "monai:SegResNet, weights identical" in proc.stdout and "resnet18" not in proc.stdout


def test_a_builtin_mismatch_prints_the_set_that_fixes_it(manifest, tmp_path):
    cfg = builtin_config(tmp_path / "c.yaml", manifest)
    proc = run_cli("train", cfg, "--out", tmp_path / "run", "--set", "model.arch=deeplabv3plus")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert ("model.decoder_channels not supported by arch 'deeplabv3plus' with encoder 'resnet18'; its settings are: "
            "aspp_channels, aspp_rates, dropout, norm, output_stride, width; to drop the others: "
            "--set model.decoder_channels=null") in proc.stderr  # fmt: skip
    fixed = load_config(cfg, ["model.arch=deeplabv3plus", "model.decoder_channels=null"])  # the printed fix loads
    assert fixed.model.arch == "deeplabv3plus" and fixed.model.width == 0.125


def test_a_planned_config_takes_the_swap(manifest, tmp_path):
    """A pipeline whose plan stage writes the config (as pipelines/auto.yaml's): ``--set
    model.arch=monai:SegResNet`` applies over the plan's DeepLabv3+ settings (width 0.5) and the
    result trains."""
    pipeline = tmp_path / "plan_train.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "plan_train", "manifest": str(manifest),
                                        "stages": ["validate", {"plan": {"measure": False, "device": "cpu"}}, "train"]}))
    sets = ["model.arch=monai:SegResNet", "model.options={init_filters: 8}",
            *(f"train.{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in TINY_TRAIN.items())]
    proc = run_cli("run", pipeline, "--out", tmp_path / "run", "--no-progress", *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    dropped = [line for line in proc.stderr.splitlines() if "model.arch monai:SegResNet: dropped" in line]
    assert len(dropped) == 1 and "model.width" in dropped[0], proc.stderr  # the plan's built-in settings, said once
    planned = yaml.safe_load((tmp_path / "run" / "plan" / "plan.yaml").read_text())["model"]
    assert planned["arch"] == "deeplabv3plus" and planned["width"] == 0.5
    used = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert used["arch"] == "monai:SegResNet" and used["width"] is None and used["in_channels"] == planned["in_channels"]
    assert (tmp_path / "run" / "train" / "last.pt").is_file()


PLUGIN = '''
"""Plug-in architectures written to the documented contract."""
from torch import nn


def build_io_fcn(in_channels, out_channels, hidden=8):
    """Needs in_channels and out_channels; no encoder."""
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, out_channels, 1))


def build_three_channels(out_channels):
    """Ignores the input width: a model for 3 channels only."""
    return nn.Conv2d(3, out_channels, 1)
'''


@pytest.fixture
def plugin_site(tmp_path, monkeypatch) -> Path:
    """``medseg_swap_plugin`` installed as pip leaves it (package + dist-info), on sys.path."""
    site = install_plugin(tmp_path / "site", "medseg_swap_plugin", PLUGIN, [
        "arch.io_fcn = medseg_swap_plugin:build_io_fcn", "arch.three_channels = medseg_swap_plugin:build_three_channels"])
    monkeypatch.syspath_prepend(str(site))
    return site


def test_plugin_builders_get_in_and_out_channels(plugin_site):
    cfg = ModelConfig(arch="io_fcn", encoder="resnet18", in_channels=6, out_channels=2, options={"hidden": 5}, width=0.5)
    assert cfg.width is None  # dropped: a plug-in takes model.options
    model = build_model(cfg)
    assert model(torch.randn(1, 6, 20, 24)).shape == (1, 2, 20, 24)
    assert not any(name.startswith("encoder") for name, _ in model.named_modules())  # no unused resnet18 built
    assert model_name("io_fcn", "resnet18") == "io_fcn" and model_name("unet", "resnet18") == "unet / resnet18"
    assert model_name("monai:SegResNet", "resnet18") == "monai:SegResNet"


def test_models_in_channels_six_lists_or_names_the_failing_model(plugin_site):
    env = {"PYTHONPATH": os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")])}
    proc = run_cli("models", "--in-channels", "6", "--arch", "io_fcn", "--arch", "three_channels", "--height", "32",
                   "--width", "32", env=env)  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[1].split()[:2] == ["io_fcn", "-"]  # the model that works is listed
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: three_channels at --in-channels 6, 32x32: RuntimeError: ")


def test_cv_and_train_share_the_drop():
    """``medseg cv`` loads its config exactly as ``train`` does (load_config with the overrides)."""
    cfg = load_config(REPO / "configs" / "demo.yaml", ["model.arch=monai:BasicUNet"])
    assert cfg.model.arch == "monai:BasicUNet" and cfg.model.width is None and cfg.model.decoder_channels is None
    build_model(cfg.model.model_copy(update={"options": {"features": [4, 4, 8, 8, 16, 4]}}))
