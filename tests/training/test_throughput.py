"""`medseg.engine.throughput`: training steps of a config timed on this machine, alone or with
batches through the data pipeline (what `medseg plan` sizes the epochs and CPU threads from)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import make_affine, make_case_files

import medseg.models
from medseg.config import Config
from medseg.engine.setup import TrainingCases
from medseg.engine.throughput import (
    MIN_STEPS,
    PIPELINE_MIN_STEPS,
    WARMUP_STEPS,
    measure_pipeline_throughput,
    measure_training_throughput,
)
from medseg.engine.trainer import Trainer
from medseg.errors import ConfigError
from medseg.manifest import Case


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


def test_pipeline_steps_take_batches_from_the_trainers_loader(tmp_path, monkeypatch):
    cases = []
    for i in range(2):
        files = make_case_files(tmp_path, f"c{i}", make_affine("lps"))
        label = files.pop("label")
        cases.append(Case(f"c{i}", f"p{i}", "MR", files, label, "train"))
    val = Case("v", "pv", "MR", {"flair": tmp_path / "missing.nii.gz"}, tmp_path / "missing_seg.nii.gz", "val")
    cfg = tiny_config(in_channels=6)  # 2 channels x 3 context slices
    cfg.train.num_workers, cfg.train.prefetch_factor = 1, 2
    shapes = []
    step = Trainer.step

    def recording_step(self, model, batch, device):
        shapes.append((tuple(batch["image"].shape), tuple(batch["label"].shape)))
        return step(self, model, batch, device)

    monkeypatch.setattr(Trainer, "step", recording_step)
    trainer_log = logging.getLogger("medseg.engine.trainer")
    threads, level = torch.get_num_threads(), trainer_log.level
    sample = TrainingCases(tmp_path / "m.csv", cases, [val], ["flair", "t1"], "MR")  # val ignored: never read
    slices_per_s = measure_pipeline_throughput(cfg, sample, "cpu", max_seconds=0.0)  # the minimum of steps
    assert math.isfinite(slices_per_s) and slices_per_s > 0
    untimed = WARMUP_STEPS + 1 * 2  # + the batches the worker prefetched
    assert shapes == [((2, 6, 32, 48), (2, 1, 32, 48))] * (untimed + PIPELINE_MIN_STEPS)
    assert torch.get_num_threads() == threads and trainer_log.level == level  # restored
    assert cfg.train.samples_per_epoch == 2000  # the caller's config is not changed
