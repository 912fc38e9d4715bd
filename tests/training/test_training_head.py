"""The output head must not be too thin to train: the demo's all-background model.

The 1x1 head reads ReLU outputs (>= 0). With all its weights negative, every logit is at most
its bias, so a binary model predicts no lesion anywhere. The demo's ResNet-18 U-Net at width
0.25 with the default decoder fed the head 4 channels, all of whose weights are negative at
seed 0: training could only push the background down and ended at val/test Dice 0.
"""

from __future__ import annotations

import torch
from conftest import REPO

from medseg.config import ModelConfig, load_config
from medseg.engine.checkpointing import seed_everything
from medseg.engine.trainer import MIN_HEAD_CHANNELS, thin_head_warning
from medseg.models import build_model

THIN = ModelConfig(arch="unet_inception", encoder="resnet18", in_channels=6, out_channels=1, width=0.25)


def test_negative_head_weights_cap_every_logit_at_the_bias():
    model = build_model(THIN).eval()
    assert model.head.in_channels == 4  # default decoder: 128 -> 64, 32, 16, 8, 4
    with torch.no_grad():
        model.head.weight.copy_(-model.head.weight.abs())
        x = torch.randn(2, 6, 64, 64) * 5
        logits = model(x)
    assert float(logits.max()) <= model.head.bias.item() + 1e-6


def test_thin_head_is_reported():
    message = thin_head_warning(build_model(THIN))
    assert message is not None and "4 decoder channel" in message and "model.decoder_channels" in message
    wide = THIN.model_copy(update={"decoder_channels": [64, 32, 16, 16, 16]})
    assert thin_head_warning(build_model(wide)) is None


def test_demo_config_trains_a_head_wide_enough():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    seed_everything(cfg.train.seed)  # the trainer's initialisation
    model = build_model(cfg.model)
    assert thin_head_warning(model) is None
    assert model.head.in_channels >= MIN_HEAD_CHANNELS
    assert (model.head.weight > 0).any()  # some feature can raise a logit above the bias
