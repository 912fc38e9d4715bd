"""CUDA paths: every registry model under bf16 autocast, GPU inference against the CPU result,
and a short AMP training run. Skipped (with the reason) on machines without a CUDA GPU, such as
CI; ``benchmarks/gpu_check.sh`` runs them on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medseg.config import Config, InferenceConfig, ModelConfig
from medseg.inference import predict_volume
from medseg.model_names import is_instance_arch
from medseg.models import build_model
from medseg.models.registry import list_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")


DENSE = [(a, e) for a, e in list_models() if not is_instance_arch(a)]
INSTANCE = [(a, e) for a, e in list_models() if is_instance_arch(a)]


@pytest.mark.parametrize("arch,encoder", DENSE)
def test_model_trains_under_bf16_autocast_on_cuda(arch, encoder):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, encoder=encoder, in_channels=6, out_channels=1, width=0.25)).cuda()
    x = torch.randn(4, 6, 96, 80, device="cuda").contiguous(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last).train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.shape == (4, 1, 96, 80)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), (x[:, :1] > 0).float())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        fp32 = model(x).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(x).float()
    assert float((bf16 - fp32).norm() / fp32.norm()) < 0.05


@pytest.mark.parametrize("arch,encoder", INSTANCE)
def test_instance_model_trains_and_detects_under_bf16_autocast_on_cuda(arch, encoder):
    from medseg.models.detection.maskrcnn import instance_targets

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, encoder=encoder, in_channels=6, out_channels=1, width=0.25)).cuda().train()
    label = torch.zeros(4, 1, 96, 80, device="cuda")
    label[:, 0, 20:40, 10:30], label[:, 0, 20:40, 30:44] = 1, 2
    x = torch.randn(4, 6, 96, 80, device="cuda") + 2 * (label > 0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = model(x, instance_targets(label))
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        found = model.eval().detect(x)
    assert len(found) == 4 and all(f["masks"].shape[1:] == (96, 80) and f["masks"].device.type == "cuda" for f in found)


def test_gpu_inference_matches_the_cpu_probabilities():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="unet_inception", encoder="resnet18", in_channels=6, width=0.25)).eval()
    volume = torch.randn(2, 90, 70, 12)
    cfg = InferenceConfig(precision="fp32", batch_size=4)
    cpu = predict_volume([model], volume, 1, cfg, "cpu")
    gpu = predict_volume([model], volume, 1, cfg, "cuda")
    assert gpu.device.type == "cpu" and gpu.shape == cpu.shape == (90, 70, 12)
    np.testing.assert_allclose(gpu.numpy(), cpu.numpy(), atol=2e-3)
    bf16 = predict_volume([model], volume, 1, InferenceConfig(precision="bf16", batch_size=4), "cuda")
    a, b = cpu.numpy() >= 0.5, bf16.numpy() >= 0.5
    assert 2 * (a & b).sum() / max(1, a.sum() + b.sum()) > 0.98


def test_short_amp_training_run_on_cuda(tmp_path: Path, phantom_manifest):
    from medseg.engine import train
    manifest = phantom_manifest(4, (64, 60, 16), seed=0, val_fraction=0.25, test_fraction=0)
    cfg = Config.model_validate({
        "data": {"manifest": str(manifest)},
        "preprocess": {"context_slices": 1},
        "model": {"arch": "unet_inception", "encoder": "resnet18", "in_channels": 6, "width": 0.25},
        "train": {"device": "cuda", "amp": "auto", "epochs": 2, "samples_per_epoch": 64, "batch_size": 16,
                  "patch_size": [64, 64], "num_workers": 0, "cache_dir": str(tmp_path / "cache")},
    })  # fmt: skip
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.epochs_done == 2
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert (history["slices_per_s"] > 0).all() and history["train_loss"].notna().all()
