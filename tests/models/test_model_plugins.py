"""Plug-in models: a package registering under the ``medseg.models`` entry-point group is found
by config validation, ``build_model`` and ``medseg models`` without editing medseg."""

from __future__ import annotations

import pytest
import torch
from conftest import install_plugin

from medseg.cli import main
from medseg.config import ModelConfig
from medseg.errors import ConfigError
from medseg.models.registry import build_model

PLUGIN = '''
"""A tiny plug-in package: one architecture and one encoder."""
import torch
from torch import nn

from medseg.models.encoders import Encoder


class TinyFCN(nn.Module):
    multiple = 1

    def __init__(self, in_channels, out_channels, hidden):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, out_channels, 1))

    def forward(self, x):
        return self.body(x)


def build_tiny_fcn(encoder, out_channels, hidden=8):
    return TinyFCN(encoder.in_channels, out_channels, hidden)


def build_two_stage_encoder(in_channels, base=4):
    stages = [nn.Sequential(nn.Conv2d(in_channels, base, 3, stride=2, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(base, 2 * base, 3, stride=2, padding=1), nn.ReLU())]
    return Encoder(stages, [base, 2 * base], [2, 4], in_channels, ["stages.0.0.weight"])
'''


@pytest.fixture
def plugin_package(tmp_path, monkeypatch):
    """``medseg_test_plugin`` installed the way pip leaves it: the package and a dist-info with
    entry_points.txt, on sys.path."""
    site = install_plugin(tmp_path / "site", "medseg_test_plugin", PLUGIN, [
        "arch.tiny_fcn = medseg_test_plugin:build_tiny_fcn", "encoder.two_stage = medseg_test_plugin:build_two_stage_encoder"])
    monkeypatch.syspath_prepend(str(site))
    return site


def test_plugin_architecture_and_encoder_are_found(plugin_package, capsys):
    cfg = ModelConfig(arch="tiny_fcn", in_channels=5, options={"hidden": 6})
    model = build_model(cfg)
    assert model.body[0].out_channels == 6
    assert model(torch.randn(1, 5, 20, 20)).shape == (1, 1, 20, 20)
    # a built-in architecture on the plug-in encoder
    unet = build_model(ModelConfig(arch="unet", encoder="two_stage", in_channels=3, options={"base": 8}))
    assert unet(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)
    assert main(["models", "--arch", "tiny_fcn"]) == 0
    assert "tiny_fcn" in capsys.readouterr().out


def test_unknown_names_list_the_plugins(plugin_package):
    with pytest.raises(ValueError, match="tiny_fcn"):
        ModelConfig(arch="tiny_fnc")
    with pytest.raises(ConfigError, match="unexpected keyword|hidden2"):
        build_model(ModelConfig(arch="tiny_fcn", options={"hidden2": 3}))


def test_without_the_package_the_name_is_unknown():
    with pytest.raises(ValueError, match="unknown arch 'tiny_fcn'"):
        ModelConfig(arch="tiny_fcn")
