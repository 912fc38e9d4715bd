"""Short CPU training runs on synthetic phantoms: loss, checkpoints, exact resume, stopping."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml

from medseg.config import Config
from medseg.engine import train
from medseg.engine.checkpointing import read_resume_state
from medseg.errors import ConfigError, MedsegError
from medseg.models.checkpoint import load_checkpoint, model_from_checkpoint


@pytest.fixture(scope="module")
def manifest(phantom_manifest) -> Path:
    return phantom_manifest(4, (48, 44, 16), seed=0, val_fraction=0.25, test_fraction=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def tiny_config(manifest: Path, cache: Path, **train: Any) -> Config:
    """A U-Net with 8-128 channels on 2 MR channels x 3 context slices, 6 steps of 8 per epoch."""
    settings = {
        "epochs": 2, "samples_per_epoch": 48, "batch_size": 8, "patch_size": [48, 48], "num_workers": 0,
        "threads": 1, "amp": "off", "cache_dir": str(cache), "save_every": 1,
        "optimizer": {"lr": 0.003}, "schedule": {"warmup_epochs": 0.5},
    }  # fmt: skip
    settings.update(train)
    return Config.model_validate(
        {
            "data": {"manifest": str(manifest)},
            "preprocess": {"context_slices": 1},
            "model": {"arch": "unet", "encoder": "unet", "in_channels": 6, "width": 0.125},
            "train": settings,
        }
    )


@pytest.fixture(scope="module")
def two_epochs(manifest, cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    result = train(tiny_config(manifest, cache), out, progress=False)
    assert result.epochs_done == 2 and result.stop_reason == "epochs"
    return out


def test_short_run_lowers_the_loss_and_writes_checkpoints(two_epochs):
    for name in ("best.pt", "last.pt", "epoch_001.pt", "epoch_002.pt", "config.yaml", "history.csv"):
        assert (two_epochs / name).is_file(), name
    assert list((two_epochs / "tensorboard").glob("events.out.tfevents.*"))
    history = pd.read_csv(two_epochs / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    assert history["train_loss"].iloc[1] < history["train_loss"].iloc[0]
    assert history["val_dice"].between(0, 1).all()
    assert yaml.safe_load((two_epochs / "config.yaml").read_text())["model"]["in_channels"] == 6


def test_checkpoint_carries_what_inference_needs(two_epochs):
    payload = load_checkpoint(two_epochs / "last.pt")
    extra = payload["extra"]
    cfg = Config.model_validate(extra["config"])
    assert extra["channels"] == ["flair", "t1"] and extra["modality"] == "MR"
    assert cfg.model.in_channels == len(extra["channels"]) * (2 * cfg.preprocess.context_slices + 1)
    assert extra["epoch"] == 2 and extra["global_step"] == 12
    # the checkpoint holds the weight average (train.ema_decay), the trained weights ride along
    assert extra["ema_updates"] == 12
    assert any(not torch.equal(payload["state_dict"][k], v) for k, v in extra["train_weights"].items())
    model, model_cfg = model_from_checkpoint(two_epochs / "best.pt")
    assert model_cfg == cfg.model
    assert model(torch.zeros(1, 6, 48, 44)).shape == (1, 1, 48, 44)


def test_resume_from_epoch_one_reproduces_epoch_two(two_epochs, manifest, cache, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(two_epochs / "epoch_001.pt", out / "last.pt")
    result = train(tiny_config(manifest, cache), out, resume=True, progress=False)
    assert result.epochs_done == 2
    resumed = load_checkpoint(out / "last.pt")["state_dict"]
    reference = load_checkpoint(two_epochs / "epoch_002.pt")["state_dict"]
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key].double(), value.double(), atol=1e-6, rtol=0, msg=key)
    a, b = read_resume_state(out / "last.pt"), read_resume_state(two_epochs / "epoch_002.pt")
    torch.testing.assert_close(a["rng"][0]["torch"], b["rng"][0]["torch"])
    assert a["metrics"]["train_loss"] == pytest.approx(b["metrics"]["train_loss"], abs=1e-6)


def test_resume_refuses_another_model_or_a_missing_run(two_epochs, manifest, cache, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    shutil.copy(two_epochs / "epoch_001.pt", out / "last.pt")
    cfg = tiny_config(manifest, cache)
    cfg.model.width = 0.25
    with pytest.raises(ConfigError, match="'model' differs"):
        train(cfg, out, resume=True, progress=False)
    with pytest.raises(MedsegError, match="not found"):
        train(tiny_config(manifest, cache), tmp_path / "empty", resume=True, progress=False)
    with pytest.raises(MedsegError, match="already holds a run"):
        train(tiny_config(manifest, cache), two_epochs, progress=False)


def test_early_stopping_and_time_budget(manifest, cache, tmp_path):
    # nothing can improve on the first validation by more than 0.5 Dice
    result = train(tiny_config(manifest, cache, epochs=5, patience=1, min_delta=0.5, samples_per_epoch=8),
                   tmp_path / "early", progress=False)  # fmt: skip
    assert (result.stop_reason, result.epochs_done, result.best_epoch) == ("early_stopping", 2, 1)
    result = train(tiny_config(manifest, cache, epochs=5, max_minutes=0.001, samples_per_epoch=8),
                   tmp_path / "budget", progress=False)  # fmt: skip
    assert (result.stop_reason, result.epochs_done) == ("time_budget", 1)
    assert len(pd.read_csv(tmp_path / "budget" / "history.csv")) == 1


def test_checkpoint_runs_through_medseg_infer(two_epochs, manifest, tmp_path):
    import nibabel as nib

    from medseg.cli import main
    from medseg.manifest import read_manifest

    out = tmp_path / "pred"
    args = ["infer", "--checkpoint", str(two_epochs / "best.pt"), "--manifest", str(manifest), "--split", "val",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    (case,) = [c for c in read_manifest(manifest) if c.split == "val"]
    mask = nib.load(str(out / f"{case.case_id}_mask.nii.gz"))
    assert mask.shape == nib.load(str(case.label)).shape


def test_inference_export_drops_training_state_and_predicts_the_same(two_epochs, tmp_path, capsys):
    from medseg.cli import main
    from medseg.config import InferenceConfig
    from medseg.inference import predict_volume
    from medseg.inference.runner import load_bundle

    slim = tmp_path / "model_inference.pt"
    assert main(["export", str(two_epochs / "best.pt"), "--format", "inference", "--out", str(slim)]) == 0
    assert "weights identical" in capsys.readouterr().out
    extra = load_checkpoint(slim)["extra"]
    assert extra["inference_only"] and not {"optimizer", "train_weights", "rng"} & set(extra)
    assert slim.stat().st_size < (two_epochs / "best.pt").stat().st_size
    volume = torch.randn(2, 40, 36, 7)
    probs = [
        predict_volume(load_bundle([path]).models, volume, 1, InferenceConfig(precision="fp32"), "cpu")
        for path in (two_epochs / "best.pt", slim)
    ]
    torch.testing.assert_close(probs[0], probs[1], rtol=0, atol=0)


def test_schedule_is_fitted_to_the_epochs_the_budget_holds(manifest, cache, tmp_path, monkeypatch):
    """The first epoch says 2 of 4 epochs fit the budget: training stops after epoch 2 with the
    learning rate decayed to zero there (not cut off at a high rate), and the fit is saved."""
    import medseg.engine.trainer as trainer_module

    calls = []

    def two_fit(done, elapsed_s, epoch_s, budget_min, margin=1.05):
        calls.append((done, budget_min))
        return 2

    monkeypatch.setattr(trainer_module, "epochs_within_budget", two_fit)
    result = train(tiny_config(manifest, cache, epochs=4, max_minutes=60, samples_per_epoch=16), tmp_path / "fit",
                   progress=False)  # fmt: skip
    assert calls == [(1, 60)]  # decided once, after the first epoch
    assert (result.stop_reason, result.epochs_done) == ("time_budget", 2)
    history = pd.read_csv(tmp_path / "fit" / "history.csv")
    assert history["lr"].iloc[-1] == pytest.approx(0.0, abs=1e-12)  # poly reached its end at epoch 2
    saved = read_resume_state(tmp_path / "fit" / "last.pt")
    assert saved["schedule_epochs"] == 2
    # a resume keeps the fitted length (and does not fit again): nothing is left to train
    result = train(tiny_config(manifest, cache, epochs=4, max_minutes=60, samples_per_epoch=16), tmp_path / "fit",
                   resume=True, progress=False)  # fmt: skip
    assert (result.stop_reason, result.epochs_done) == ("time_budget", 2) and calls == [(1, 60)]
