"""Local pretrained weights with key maps: a torchvision-layout ResNet-18 state dict loads into
medseg's resnet18 encoder with no missing key and the outputs of a directly assigned copy."""

from __future__ import annotations

import re

import pytest
import torch

from medseg.config import ModelConfig
from medseg.errors import MedsegError
from medseg.models.encoders import adapt_input_conv
from medseg.models.pretrained import load_pretrained
from medseg.models.registry import ENCODERS, build_model

TO_TORCHVISION = ((r"^stages\.0\.0\.", "conv1."), (r"^stages\.0\.1\.", "bn1."), (r"^stages\.1\.1\.", "layer1."),
                  (r"^stages\.2\.", "layer2."), (r"^stages\.3\.", "layer3."), (r"^stages\.4\.", "layer4."))  # fmt: skip


def torchvision_resnet18_state(in_channels: int = 3, seed: int = 3) -> dict[str, torch.Tensor]:
    """A ResNet-18 state dict in torchvision's key names and shapes (random values, a 1000-class fc)."""
    torch.manual_seed(seed)
    source = ENCODERS["resnet18"](in_channels=in_channels)
    state = {}
    for key, value in source.state_dict().items():
        for pattern, target in TO_TORCHVISION:
            if re.match(pattern, key):
                key = re.sub(pattern, target, key)
                break
        if "running_var" in key:  # a variance is positive
            state[key] = torch.rand_like(value) + 0.5
        else:
            state[key] = torch.randn_like(value.float()).to(value.dtype) if value.is_floating_point() else value.clone()
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return state


def test_expected_torchvision_names():
    state = torchvision_resnet18_state()
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.weight", "layer4.1.bn2.bias", "fc.weight"):  # fmt: skip
        assert key in state, key
    assert state["conv1.weight"].shape == (64, 3, 7, 7) and state["layer1.0.conv1.weight"].shape == (64, 64, 3, 3)


@pytest.mark.parametrize("key_map", ["torchvision", "timm", "monai"])
def test_torchvision_resnet18_loads_with_identical_outputs(tmp_path, key_map):
    state = torchvision_resnet18_state()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    encoder = ENCODERS["resnet18"](in_channels=3)
    report = load_pretrained(encoder, path, key_map)
    assert report.missing == [] and report.unexpected == [] and report.ignored == ["fc.bias", "fc.weight"]
    # a copy assigned key by key, by hand
    direct = ENCODERS["resnet18"](in_channels=3)
    own = direct.state_dict()
    assigned = {k: state[k.replace("stages.0.0.", "conv1.").replace("stages.0.1.", "bn1.").replace("stages.1.1.", "layer1.")
                         .replace("stages.2.", "layer2.").replace("stages.3.", "layer3.").replace("stages.4.", "layer4.")]
                for k in own}  # fmt: skip
    direct.load_state_dict(assigned)
    x = torch.randn(2, 3, 64, 64)
    encoder.eval(), direct.eval()
    with torch.no_grad():
        for a, b in zip(encoder(x), direct(x), strict=True):
            assert torch.equal(a, b)


def test_first_conv_adapts_to_25d_inputs(tmp_path):
    state = torchvision_resnet18_state()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = build_model(ModelConfig(arch="unet", encoder="resnet18", in_channels=9, pretrained=str(path),
                                    pretrained_map="torchvision"))  # fmt: skip
    conv = model.encoder.state_dict()["stages.0.0.weight"]
    assert torch.equal(conv, adapt_input_conv(state["conv1.weight"], 9))
    # three copies of an RGB image on 9 channels: the stem sees what the 3-channel network saw
    assert torch.allclose(conv.reshape(64, 3, 3, 7, 7).sum(1), state["conv1.weight"], atol=1e-5)


def test_mismatches_are_errors_unless_not_strict(tmp_path, caplog):
    state = torchvision_resnet18_state()
    del state["layer4.1.bn2.weight"]
    state["layer9.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(MedsegError, match=r"partial.pth: weights do not fit this encoder \(1 missing, 1 unexpected"):
        build_model(ModelConfig(arch="unet", encoder="resnet18", pretrained=str(path), pretrained_map="torchvision"))
    encoder = ENCODERS["resnet18"](in_channels=3)
    report = load_pretrained(encoder, path, "torchvision", strict=False)
    assert report.missing == ["stages.4.1.bn2.weight"] and report.unexpected == ["layer9.0.conv1.weight"]
    assert torch.equal(encoder.state_dict()["stages.4.0.conv1.weight"], state["layer4.0.conv1.weight"])
    with pytest.raises(MedsegError, match="not a ResNet"):
        build_model(ModelConfig(arch="unet", encoder="xception", pretrained=str(path), pretrained_map="torchvision"))


def test_flexible_unet_encoder_takes_torchvision_weights(tmp_path):
    monai_model = build_model(ModelConfig(arch="monai:FlexibleUNet", in_channels=3, options={"backbone": "resnet18"}))
    state = {k: torch.rand_like(v) + 0.5 if "running_var" in k else torch.randn_like(v) if v.is_floating_point() else v
             for k, v in monai_model.net.encoder.state_dict().items()}  # fmt: skip
    state["fc.weight"] = torch.randn(1000, 512)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": state}, path)
    model = build_model(ModelConfig(arch="monai:FlexibleUNet", in_channels=6, options={"backbone": "resnet18"},
                                    pretrained=str(path), pretrained_map="torchvision"))  # fmt: skip
    loaded = model.net.encoder.state_dict()
    assert torch.equal(loaded["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    assert torch.equal(loaded["conv1.weight"], adapt_input_conv(state["conv1.weight"], 6))
