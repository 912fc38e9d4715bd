"""`medseg.engine.throughput`: training steps of a config timed on this machine (what `medseg plan`
sizes the epochs from)."""

from __future__ import annotations

import math

import pytest
import torch

import medseg.models
from medseg.config import Config
from medseg.engine.throughput import MIN_STEPS, WARMUP_STEPS, measure_training_throughput
from medseg.errors import ConfigError


def tiny_config(**model) -> Config:
    return Config.model_validate({
        "model": {"arch": "unet", "encoder": "unet", "in_channels": 3, "width": 0.25, **model},
        "train": {"batch_size": 2, "patch_size": [32, 48], "threads": 1, "amp": "off"},
    })  # fmt: skip


def test_steps_of_the_planned_batch_are_timed(monkeypatch):
    built, initial, shapes = [], [], []

    def recording_build(cfg):
        model = build_model(cfg)
        model.register_forward_pre_hook(lambda _module, args: shapes.append(tuple(args[0].shape)))
        built.append(model)
        initial.extend(p.detach().clone() for p in model.parameters())
        return model

    build_model = medseg.models.build_model
    monkeypatch.setattr(medseg.models, "build_model", recording_build)
    threads = torch.get_num_threads()
    slices_per_s = measure_training_throughput(tiny_config(), "cpu", max_seconds=0.0)  # the minimum of steps
    assert math.isfinite(slices_per_s) and slices_per_s > 0
    assert shapes == [(2, 3, 32, 48)] * (WARMUP_STEPS + MIN_STEPS)  # batch x in_channels x patch, every step
    assert len(built) == 1 and any(not torch.equal(a, b) for a, b in zip(initial, built[0].parameters(), strict=True))  # real steps
    assert torch.get_num_threads() == threads  # train.threads applied for the measurement only


def test_unmeasurable_configs_say_why():
    with pytest.raises(ConfigError, match="maskrcnn"):
        measure_training_throughput(tiny_config(arch="maskrcnn", encoder="resnet18", out_channels=2))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            measure_training_throughput(tiny_config(), "cuda")
