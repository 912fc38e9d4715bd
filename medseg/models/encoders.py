"""Encoders: one contract, a list of feature maps plus their channel counts and strides.

The contract (what every decoder relies on)::

    encoder = build_encoder(name, in_channels=9)
    features = encoder(x)            # x: (B, in_channels, H, W), H and W multiples of max(strides)
    len(features) == len(encoder.out_channels) == len(encoder.strides)
    features[i].shape == (B, encoder.out_channels[i], H // encoder.strides[i], W // encoder.strides[i])

Strides double from one feature to the next (before ``set_output_stride``), shallowest first:

========== ==================== ========================================== ==========
encoder    strides              out_channels (width 1)                      params
========== ==================== ========================================== ==========
unet       1, 2, 4, 8, 16       64, 128, 256, 512, 1024                     18.8 M
resnet18   2, 4, 8, 16, 32      64, 64, 128, 256, 512                       11.2 M
resnet34   2, 4, 8, 16, 32      64, 64, 128, 256, 512                       21.3 M
resnet50   2, 4, 8, 16, 32      64, 256, 512, 1024, 2048                    23.5 M
xception   2, 4, 8, 16, 32      64, 128, 256, 728, 2048                     37.9 M
========== ==================== ========================================== ==========

The raw input is not part of the list (smp returns it as ``features[0]``; here a decoder that
wants a stride-1 skip gets one only from an encoder that computes one, the plain U-Net).
``width`` multiplies every channel count (``max(1, round(c * width))``).

``set_output_stride(8 | 16)`` turns the last stages' downsampling into dilation (DeepLab's
atrous encoder): convs lose their stride, 3x3 kernels get dilation ``stride / output_stride``,
max-pools become identities, and ``strides`` is updated (e.g. ``2, 4, 8, 16, 16`` at 16).

``input_conv_keys`` names the state-dict keys of the conv weights that read the raw input;
:func:`medseg.models.pretrained.load_pretrained` adapts exactly those when a weights file has
another input channel count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

from medseg.models.blocks import DoubleConv, SeparableConv2d, make_norm, pad_to_multiple


def scale_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    return max(1, int(round(channels * width)))


class Encoder(nn.Module):
    """Sequential stages; stage ``i`` produces feature ``i``.

    ``forward``: ``(B, in_channels, H, W) -> [(B, out_channels[i], H / strides[i], W / strides[i])]``.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        out_channels: Sequence[int],
        strides: Sequence[int],
        in_channels: int,
        input_conv_keys: Sequence[str],
    ) -> None:
        super().__init__()
        if not len(stages) == len(out_channels) == len(strides):
            raise ValueError("stages, out_channels and strides must have the same length")
        self.stages = nn.ModuleList(stages)
        self.out_channels = list(out_channels)
        self.strides = list(strides)
        self.in_channels = in_channels
        self.input_conv_keys = list(input_conv_keys)
        self.output_stride = max(self.strides)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def set_output_stride(self, output_stride: int) -> None:
        """Replace downsampling by dilation in every stage deeper than ``output_stride`` (once)."""
        if len(set(self.strides)) != len(self.strides):
            raise RuntimeError(f"encoder already dilated to output stride {self.output_stride}")
        if output_stride not in self.strides:
            raise ValueError(f"output stride {output_stride} not among this encoder's strides {self.strides}")
        for i, stride in enumerate(self.strides):
            if stride > output_stride:
                dilate(self.stages[i], stride // output_stride)
                self.strides[i] = output_stride
        self.output_stride = output_stride


class EncoderDecoder(nn.Module):
    """Encoder -> decoder -> 1x1 conv head: the set-up and forward every encoder-decoder
    architecture shares (``UNet``, ``DeepLabV3Plus``; MONAI's ``BaseEncoder`` idea on the model side).

    ``forward``: ``(B, Cin, H, W) -> (B, out_channels, H, W)`` logits for any ``H x W``: the
    input is edge-padded (bottom/right) to a multiple of the encoder's deepest stride
    (:func:`pad_to_multiple`), the decoder's output ``(B, decoder.out_channels, h, w)`` goes
    through the head, :meth:`to_input_size` brings the logits to the padded size, and they are
    cropped back. ``decoder``: a module taking the encoder's feature list and exposing
    ``out_channels``. State-dict keys: ``encoder.*``, ``decoder.*``, ``head.*``.
    """

    def __init__(self, encoder: Encoder, decoder: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = nn.Conv2d(decoder.out_channels, out_channels, kernel_size=1)
        self.multiple = max(encoder.strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        padded = pad_to_multiple(x, self.multiple)
        logits = self.to_input_size(self.head(self.decoder(self.encoder(padded))), padded)
        return logits[..., :h, :w]

    def to_input_size(self, logits: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """``logits`` at the size of ``padded`` (the padded input); the identity for a decoder that
        ends at full resolution (U-Net), overridden by one that does not (DeepLabv3+)."""
        return logits


def dilate(module: nn.Module, dilation: int) -> None:
    """In place: strided convs/pools in ``module`` get stride 1, kxk convs get ``dilation``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
            if m.kernel_size[0] > 1:
                m.dilation = (dilation, dilation)
                m.padding = tuple(dilation * (k - 1) // 2 for k in m.kernel_size)
        elif isinstance(m, nn.MaxPool2d):
            m.kernel_size, m.stride, m.padding = 1, 1, 0


# ----------------------------------------------------------------------------- plain U-Net


def unet_encoder(
    in_channels: int, width: float = 1.0, norm: str = "batch", residual: bool = False
) -> Encoder:
    """Classic U-Net contracting path: double 3x3 conv blocks, 2x2 max-pool, channels doubling.

    Features at strides 1, 2, 4, 8, 16 with ``64 * width * 2**i`` channels.
    """
    channels = [scale_channels(64 * 2**i, width) for i in range(5)]
    stages: list[nn.Module] = [DoubleConv(in_channels, channels[0], norm=norm, residual=residual)]
    for i in range(1, 5):
        stages.append(
            nn.Sequential(
                nn.MaxPool2d(2), DoubleConv(channels[i - 1], channels[i], norm=norm, residual=residual)
            )
        )
    keys = (
        ["stages.0.0.conv.unit0.conv.weight", "stages.0.0.residual.weight"]
        if residual
        else ["stages.0.0.conv.weight"]
    )
    return Encoder(stages, channels, [1, 2, 4, 8, 16], in_channels, keys)


# ----------------------------------------------------------------------------- ResNet


def _resnet_layer(
    block: type[ResNetBlock | ResNetBottleneck],
    in_planes: int,
    planes: int,
    blocks: int,
    stride: int,
    norm: str,
) -> nn.Sequential:
    out_planes = planes * block.expansion
    downsample = None
    if stride != 1 or in_planes != out_planes:
        downsample = nn.Sequential(
            nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), make_norm(norm, out_planes)
        )
    norm_arg = ("instance", {"affine": True}) if norm == "instance" else "batch"
    layers = [block(in_planes, planes, spatial_dims=2, stride=stride, downsample=downsample, norm=norm_arg)]
    layers += [block(out_planes, planes, spatial_dims=2, norm=norm_arg) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _resnet(
    block: type[ResNetBlock | ResNetBottleneck],
    layers: Sequence[int],
    in_channels: int,
    width: float,
    norm: str,
) -> Encoder:
    """ResNet (He et al.) from MONAI's residual blocks; stride on the 3x3 conv (v1.5).

    Stages: 7x7/2 stem conv -> norm -> ReLU (stride 2); 3x3/2 max-pool + layer1 (stride 4);
    layer2, layer3, layer4 (strides 8, 16, 32).
    """
    planes = [scale_channels(c, width) for c in (64, 128, 256, 512)]
    stem = nn.Sequential(
        nn.Conv2d(in_channels, planes[0], 7, stride=2, padding=3, bias=False),
        make_norm(norm, planes[0]),
        nn.ReLU(inplace=True),
    )
    stages: list[nn.Module] = [stem]
    channels = [planes[0]]
    in_planes = planes[0]
    for i, (p, n) in enumerate(zip(planes, layers, strict=True)):
        layer = _resnet_layer(block, in_planes, p, n, 1 if i == 0 else 2, norm)
        stages.append(nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1), layer) if i == 0 else layer)
        in_planes = p * block.expansion
        channels.append(in_planes)
    encoder = Encoder(stages, channels, [2, 4, 8, 16, 32], in_channels, ["stages.0.0.weight"])
    for m in encoder.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return encoder


def resnet18_encoder(in_channels: int, width: float = 1.0, norm: str = "batch") -> Encoder:
    """ResNet-18: basic blocks (2, 2, 2, 2); channels 64, 64, 128, 256, 512 at width 1."""
    return _resnet(ResNetBlock, (2, 2, 2, 2), in_channels, width, norm)


def resnet34_encoder(in_channels: int, width: float = 1.0, norm: str = "batch") -> Encoder:
    """ResNet-34: basic blocks (3, 4, 6, 3); channels 64, 64, 128, 256, 512 at width 1."""
    return _resnet(ResNetBlock, (3, 4, 6, 3), in_channels, width, norm)


def resnet50_encoder(in_channels: int, width: float = 1.0, norm: str = "batch") -> Encoder:
    """ResNet-50: bottleneck blocks (3, 4, 6, 3); channels 64, 256, 512, 1024, 2048 at width 1."""
    return _resnet(ResNetBottleneck, (3, 4, 6, 3), in_channels, width, norm)


# ----------------------------------------------------------------------------- Xception


class XceptionBlock(nn.Module):
    """Three separable convs (the last one strided) plus a shortcut; ``(B, Cin, H, W) -> (B, C3, H/s, W/s)``.

    The shortcut is a 1x1 strided conv -> norm when the shape changes, else the identity.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], stride: int, norm: str) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.convs = nn.Sequential(
            SeparableConv2d(in_channels, c1, norm=norm),
            SeparableConv2d(c1, c2, norm=norm),
            SeparableConv2d(c2, c3, stride=stride, norm=norm, act_last=False),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != c3:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, c3, 1, stride=stride, bias=False), make_norm(norm, c3)
            )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.convs(x) + self.shortcut(x))


def xception_encoder(
    in_channels: int, width: float = 1.0, norm: str = "batch", middle_blocks: int = 16
) -> Encoder:
    """Aligned Xception-65 as modified for DeepLabv3+ (all pooling replaced by strided separable convs).

    Entry flow: 3x3/2 conv (32) -> 3x3 conv (64) [stride 2]; block 128/2 [stride 4];
    block 256/2 [stride 8]; block 728/2 + ``middle_blocks`` residual blocks of 728 [stride 16];
    exit flow: block (728, 1024, 1024)/2 -> separable 1536, 1536, 2048 [stride 32].
    """

    def c(n: int) -> int:
        return scale_channels(n, width)

    stem = nn.Sequential(
        nn.Conv2d(in_channels, c(32), 3, stride=2, padding=1, bias=False),
        make_norm(norm, c(32)),
        nn.ReLU(),
        nn.Conv2d(c(32), c(64), 3, padding=1, bias=False),
        make_norm(norm, c(64)),
        nn.ReLU(),
    )
    block1 = XceptionBlock(c(64), [c(128)] * 3, 2, norm)
    block2 = XceptionBlock(c(128), [c(256)] * 3, 2, norm)
    middle = nn.Sequential(
        XceptionBlock(c(256), [c(728)] * 3, 2, norm),
        *[XceptionBlock(c(728), [c(728)] * 3, 1, norm) for _ in range(middle_blocks)],
    )
    exit_flow = nn.Sequential(
        XceptionBlock(c(728), [c(728), c(1024), c(1024)], 2, norm),
        SeparableConv2d(c(1024), c(1536), norm=norm),
        SeparableConv2d(c(1536), c(1536), norm=norm),
        SeparableConv2d(c(1536), c(2048), norm=norm),
    )
    channels = [c(64), c(128), c(256), c(728), c(2048)]
    return Encoder(
        [stem, block1, block2, middle, exit_flow],
        channels,
        [2, 4, 8, 16, 32],
        in_channels,
        ["stages.0.0.weight"],
    )


# ----------------------------------------------------------------------------- pretrained weights


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a conv kernel ``(O, I, k, k)`` to ``in_channels`` inputs (smp's ``patch_first_conv``).

    One channel: the kernel summed over its inputs. Otherwise the input channels are repeated
    cyclically and scaled by ``I / in_channels`` so that an input whose channels all carry the
    same image keeps the same pre-activation.
    """
    old = weight.shape[1]
    if old == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    index = torch.arange(in_channels) % old
    return weight[:, index] * (old / in_channels)
