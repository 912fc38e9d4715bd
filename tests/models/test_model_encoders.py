"""Encoder contract (feature list, channels, strides), input-channel adaptation, local pretrained weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medseg.config import ModelConfig
from medseg.errors import MedsegError
from medseg.models import ENCODERS, build_model, list_encoders
from medseg.models.checkpoint import save_checkpoint
from medseg.models.encoders import adapt_input_conv

EXPECTED_STRIDES = {
    "unet": [1, 2, 4, 8, 16],
    "resnet18": [2, 4, 8, 16, 32],
    "resnet34": [2, 4, 8, 16, 32],
    "resnet50": [2, 4, 8, 16, 32],
    "xception": [2, 4, 8, 16, 32],
}
FULL_WIDTH_CHANNELS = {
    "unet": [64, 128, 256, 512, 1024],
    "resnet18": [64, 64, 128, 256, 512],
    "resnet34": [64, 64, 128, 256, 512],
    "resnet50": [64, 256, 512, 1024, 2048],
    "xception": [64, 128, 256, 728, 2048],
}


@pytest.mark.parametrize("name", list_encoders())
def test_encoder_contract(name):
    assert ENCODERS[name](in_channels=3).out_channels == FULL_WIDTH_CHANNELS[name]
    encoder = ENCODERS[name](in_channels=9, width=0.125).eval()
    assert encoder.strides == EXPECTED_STRIDES[name]
    with torch.no_grad():
        features = encoder(torch.randn(2, 9, 64, 96))
    assert len(features) == len(encoder.out_channels) == len(encoder.strides)
    for feature, channels, stride in zip(features, encoder.out_channels, encoder.strides, strict=True):
        assert feature.shape == (2, channels, 64 // stride, 96 // stride)
    for key in encoder.input_conv_keys:
        assert encoder.state_dict()[key].shape[1] == 9


def test_adapt_input_conv():
    w = torch.randn(8, 3, 3, 3)
    assert torch.equal(adapt_input_conv(w, 3), w)
    assert torch.allclose(adapt_input_conv(w, 1), w.sum(1, keepdim=True))
    w9 = adapt_input_conv(w, 9)
    assert w9.shape == (8, 9, 3, 3)
    assert torch.allclose(w9[:, 4], w[:, 1] / 3)
    # an image repeated over the channels gives the same pre-activation as before
    img = torch.randn(1, 1, 16, 16)
    assert torch.allclose(
        F.conv2d(img.repeat(1, 9, 1, 1), w9), F.conv2d(img.repeat(1, 3, 1, 1), w), atol=1e-5
    )
    assert torch.allclose(
        F.conv2d(img, adapt_input_conv(w, 1)), F.conv2d(img.repeat(1, 3, 1, 1), w), atol=1e-5
    )


@pytest.mark.parametrize("encoder", ["resnet18", "unet"])
@pytest.mark.parametrize("source", ["state_dict", "checkpoint"])
def test_pretrained_weights_adapt_in_channels(tmp_path, encoder, source):
    torch.manual_seed(0)
    base_cfg = ModelConfig(arch="unet", encoder=encoder, in_channels=3, width=0.125)
    source_model = build_model(base_cfg)
    path = tmp_path / "weights.pt"
    if source == "state_dict":
        torch.save(source_model.encoder.state_dict(), path)
    else:
        save_checkpoint(path, source_model, base_cfg, {})
    torch.manual_seed(1)
    model = build_model(base_cfg.model_copy(update={"in_channels": 9, "pretrained": str(path)}))
    src, dst = source_model.encoder.state_dict(), model.encoder.state_dict()
    first = set(model.encoder.input_conv_keys)
    for key, value in src.items():
        if key in first:
            assert torch.allclose(dst[key], adapt_input_conv(value, 9))
        else:
            assert torch.equal(dst[key], value), key


def test_pretrained_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(MedsegError, match="nope.pt: pretrained weights file not found"):
        build_model(ModelConfig(arch="unet", encoder="resnet18", width=0.125, pretrained_path=str(missing)))
    other = tmp_path / "resnet34.pt"
    torch.save(ENCODERS["resnet34"](in_channels=3, width=0.125).state_dict(), other)
    with pytest.raises(MedsegError, match="resnet34.pt: weights do not fit this encoder"):
        build_model(ModelConfig(arch="unet", encoder="resnet18", width=0.125, pretrained_path=str(other)))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(MedsegError, match="garbage.pt: cannot read pretrained weights"):
        build_model(ModelConfig(arch="unet", encoder="resnet18", width=0.125, pretrained_path=str(garbage)))
