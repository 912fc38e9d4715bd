"""Inception block on the skip path, ASPP at batch size 1, separable conv, padding."""

from __future__ import annotations

import pytest
import torch

from medseg.config import ModelConfig
from medseg.models import build_model, list_encoders
from medseg.models.blocks import ASPP, InceptionBlock, SeparableConv2d, pad_to_multiple
from medseg.models.complexity import count_parameters


def _inception_blocks(model):
    return [m for m in model.modules() if isinstance(m, InceptionBlock)]


@pytest.mark.parametrize("encoder", ["unet", "resnet18"])
def test_inception_output_is_what_the_decoder_concatenates(encoder):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="unet_inception", encoder=encoder, width=0.125)).eval()
    inception_out, conv_in = {}, {}
    hooks = []
    for i, block in enumerate(model.decoder.blocks):
        if isinstance(block.skip_block, InceptionBlock):
            hooks.append(
                block.skip_block.register_forward_hook(
                    lambda m, a, out, i=i: inception_out.__setitem__(i, out)
                )
            )
        hooks.append(block.conv.register_forward_pre_hook(lambda m, a, i=i: conv_in.__setitem__(i, a[0])))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    n_skips = len(model.encoder.out_channels) - 1
    assert len(inception_out) == n_skips  # one inception block per skip connection, and every one ran
    for i, out in inception_out.items():
        skip_ch = model.encoder.out_channels[-2 - i]
        assert out.shape[1] == skip_ch
        # the decoder block's conv sees cat([inception(skip), up(x)]): its first channels are the block's output
        assert torch.equal(conv_in[i][:, :skip_ch], out)


@pytest.mark.parametrize("encoder", list_encoders())
def test_unet_and_unet_inception_differ_exactly_by_the_inception_blocks(encoder):
    plain = build_model(ModelConfig(arch="unet", encoder=encoder, width=0.25))
    incep = build_model(ModelConfig(arch="unet_inception", encoder=encoder, width=0.25))
    blocks = _inception_blocks(incep)
    assert len(blocks) == len(incep.encoder.out_channels) - 1
    assert not _inception_blocks(plain)
    assert count_parameters(incep) - count_parameters(plain) == sum(count_parameters(b) for b in blocks)


def test_parameter_difference_at_default_width():
    plain = build_model(ModelConfig(arch="unet", encoder="resnet34"))
    incep = build_model(ModelConfig(arch="unet_inception", encoder="resnet34"))
    extra = sum(count_parameters(b) for b in _inception_blocks(incep))
    assert extra > 0 and count_parameters(incep) - count_parameters(plain) == extra


def test_inception_block_branches():
    block = InceptionBlock(64, fractions=(0.25, 0.5, 0.125, 0.125)).eval()
    assert [
        block.b1.conv.out_channels,
        block.b3[1].conv.out_channels,
        block.b5[2].conv.out_channels,
        block.pool[1].conv.out_channels,
    ] == [16, 32, 8, 8]
    assert block.project.conv.in_channels == 64 and block.project.conv.out_channels == 64
    assert block.b5[1].conv.kernel_size == (3, 3) and block.b5[2].conv.kernel_size == (3, 3)  # factorised 5x5
    x = torch.randn(2, 64, 12, 10)
    assert block(x).shape == x.shape


def test_aspp_trains_at_batch_size_one():
    aspp = ASPP(32, 16, rates=(1, 2, 3)).train()
    x = torch.randn(1, 32, 8, 8, requires_grad=True)
    y = aspp(x)
    assert y.shape == (1, 16, 8, 8)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_deeplab_trains_at_batch_size_one():
    model = build_model(ModelConfig(arch="deeplabv3plus", encoder="resnet18", width=0.125)).train()
    y = model(torch.randn(1, 3, 64, 48))
    assert y.shape == (1, 1, 64, 48)
    y.sum().backward()


def test_separable_conv_is_depthwise_then_pointwise():
    conv = SeparableConv2d(16, 32, stride=2, dilation=2)
    depthwise, pointwise = conv[0], conv[3]
    assert depthwise.groups == 16 and depthwise.dilation == (2, 2) and pointwise.kernel_size == (1, 1)
    assert conv(torch.randn(1, 16, 20, 20)).shape == (1, 32, 10, 10)
    assert count_parameters(conv) < 16 * 32 * 9


def test_pad_to_multiple():
    x = torch.randn(1, 2, 33, 64)
    y = pad_to_multiple(x, 32)
    assert y.shape == (1, 2, 64, 64)
    assert torch.equal(y[..., :33, :64], x)
    # edge replication (0 would be average tissue in a normalised image)
    assert torch.equal(y[..., 33:, :], x[..., 32:33, :].expand(1, 2, 31, 64))
