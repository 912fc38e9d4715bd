"""Parameter count, GFLOPs, theoretical receptive field, and the `medseg models` command."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.cli import main
from medseg.config import ModelConfig
from medseg.models import build_model, list_models
from medseg.models.complexity import count_gflops, count_parameters, receptive_field


def test_parameters_and_flops_of_a_conv():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_parameters(conv) == 3 * 8 * 9 + 8
    conv.bias.requires_grad_(False)
    assert count_parameters(conv, trainable_only=True) == 3 * 8 * 9
    assert count_gflops(conv, 3, 16, 20) == pytest.approx(2 * 3 * 8 * 9 * 16 * 20 / 1e9)


@pytest.mark.parametrize(
    "layers,expected",
    [
        ([nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)], 5),
        ([nn.Conv2d(1, 2, 3, padding=2, dilation=2)], 5),
        ([nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(2, 2, 3, padding=1)], 3 + 1 + 2 * 2),
        ([nn.Conv2d(1, 2, 7, stride=2, padding=3), nn.Conv2d(2, 2, 3, padding=1)], 7 + 2 * 2),
        # 2x2/2 transposed conv adds nothing; the following 3x3 conv runs at jump 1 again
        (
            [
                nn.MaxPool2d(2),
                nn.Conv2d(1, 2, 3, padding=1),
                nn.ConvTranspose2d(2, 2, 2, 2),
                nn.Conv2d(2, 2, 3, padding=1),
            ],
            2 + 4 + 0 + 2,
        ),
        ([nn.MaxPool2d(2), nn.Upsample(scale_factor=2, mode="bilinear")], 2 + 2),
    ],
)
def test_receptive_field_of_chains(layers, expected):
    rf = receptive_field(nn.Sequential(*layers), 1, size=32)
    assert rf.pixels == expected and not rf.global_pooling


def test_receptive_field_of_models():
    # classic U-Net: 4 poolings, two 3x3 convs per level on both paths -> 200 px (hand-computed)
    unet = build_model(ModelConfig(arch="unet", encoder="unet", width=0.125))
    assert receptive_field(unet, 3).pixels == 200
    assert receptive_field(unet, 3, size=96).pixels == 200  # independent of the probe size
    deeplab = build_model(ModelConfig(arch="deeplabv3plus", encoder="resnet18", width=0.125))
    rf = receptive_field(deeplab, 3)
    assert (
        rf.global_pooling
        and rf.pixels
        > receptive_field(build_model(ModelConfig(arch="unet", encoder="resnet18", width=0.125)), 3).pixels
    )
    assert str(rf).endswith("+ global")


def test_complexity_leaves_training_mode_alone():
    model = build_model(ModelConfig(arch="unet", encoder="resnet18", width=0.125)).train()
    count_gflops(model, 3, 64, 64)
    receptive_field(model, 3)
    assert model.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_models_command(capsys):
    args = [
        "models",
        "--arch",
        "unet",
        "--encoder",
        "unet",
        "--encoder",
        "resnet18",
        "--channel-width",
        "0.125",
    ]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:2] == ["arch", "encoder"] and len(lines) == 3
    row = lines[1].split()
    assert row[:2] == ["unet", "unet"] and row[-1] == "200"
    assert float(row[2]) == pytest.approx(
        count_parameters(build_model(ModelConfig(arch="unet", encoder="unet", width=0.125))) / 1e6, abs=0.006
    )
    assert main([*args, "--format", "markdown"]) == 0
    md = capsys.readouterr().out.strip().splitlines()
    assert md[0].startswith("| arch | encoder |") and md[1].startswith("|---") and len(md) == 4


def test_models_command_rejects_unknown_names(capsys):
    assert main(["models", "--arch", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown arch 'nope'" in err and all(arch in err for arch, _ in list_models())
    assert main(["models", "--encoder", "resnet101"]) == 2
    assert "unknown encoder 'resnet101'; valid: unet, resnet18" in capsys.readouterr().err
