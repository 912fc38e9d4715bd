"""SegNet: the decoder upsamples with the encoder's max-pooling indices (no skip concatenation)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.config import ModelConfig
from medseg.models.registry import build_model


def window_input(offset: tuple[int, int], channels: int = 8, size: int = 32) -> torch.Tensor:
    """Negative noise, with the maximum of every 2x2 window at ``offset`` (row, column) in it."""
    torch.manual_seed(0)
    x = -1.0 - 0.5 * torch.rand(1, channels, size, size)
    x[..., offset[0]::2, offset[1]::2] = 1.0
    return x


def full_resolution_unpool(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of the decoder's last unpooling (stride 2 -> 1) for input ``x``."""
    outputs = []
    handle = model.unpool.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return outputs[-1]


def test_moving_a_max_moves_the_unpooled_value():
    model = build_model(ModelConfig(arch="segnet", encoder="unet", in_channels=8, width=0.125)).eval()
    assert model.encoder.out_channels[0] == 8
    model.encoder.stages[0] = nn.Identity()  # the first pool sees the input itself
    first = full_resolution_unpool(model, window_input((0, 0)))
    moved = full_resolution_unpool(model, window_input((1, 1)))
    assert first.shape == (1, 8, 32, 32) and first.abs().sum() > 0
    # values only where the maxima were; moving the maxima moves them, unchanged
    assert first[..., 1::2, :].abs().sum() == 0 and first[..., :, 1::2].abs().sum() == 0
    assert moved[..., 0::2, :].abs().sum() == 0 and moved[..., :, 0::2].abs().sum() == 0
    assert torch.equal(moved[..., 1::2, 1::2], first[..., 0::2, 0::2])


def test_no_skip_concatenation_and_any_size():
    model = build_model(ModelConfig(arch="segnet", encoder="unet", in_channels=3, width=0.25)).eval()
    c = model.encoder.out_channels
    # every decoder block takes only the deeper level's channels (a U-Net block would take c[i] + c[i-1])
    assert [b[0].in_channels for b in model.blocks] == c[:0:-1]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 50, 38)).shape == (2, 1, 50, 38)


@pytest.mark.parametrize("encoder", ["resnet18", "xception"])
def test_encoders_without_pooling_indices_are_refused(encoder):
    with pytest.raises(ValueError, match="downsamples by max-pooling"):
        ModelConfig(arch="segnet", encoder=encoder)


def test_scatter_unpooling_is_pytorchs_max_unpool():
    import torch.nn.functional as F

    from medseg.models.segnet import MaxUnpool2x

    x = torch.randn(2, 3, 8, 6)
    pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    assert torch.equal(MaxUnpool2x()(pooled, indices), F.max_unpool2d(pooled, indices, 2))
