"""Building blocks shared by the encoders and decoders: conv blocks, inception, ASPP, separable conv.

Everything here is 2-D and works on ``(B, C, H, W)`` tensors. Plain convolutions are MONAI's
``Convolution`` / ``ResidualUnit`` (conv -> norm -> act); the blocks MONAI does not have
(inception on a skip connection, depthwise-separable conv, ASPP) are written here from those
same pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

# norm name (as written in the config) -> MONAI norm spec
NORMS: dict[str, tuple[str, dict]] = {
    "batch": ("batch", {}),
    "instance": ("instance", {"affine": True}),
}


def norm_spec(norm: str) -> tuple[str, dict]:
    """MONAI norm spec for a config norm name; unknown names list the valid ones."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    return NORMS[norm]


def make_norm(norm: str, channels: int) -> nn.Module:
    """A 2-D norm layer over ``channels`` (``batch`` or ``instance`` with affine parameters)."""
    name = norm_spec(norm)[0]
    if name == "batch":
        return nn.BatchNorm2d(channels)
    return nn.InstanceNorm2d(channels, affine=True)


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    dilation: int = 1,
    norm: str = "batch",
    dropout: float | None = None,
) -> Convolution:
    """``kernel_size`` conv (same padding, no bias) -> norm -> (dropout) -> ReLU.

    ``(B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)``.
    """
    return Convolution(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        strides=stride,
        kernel_size=kernel_size,
        dilation=dilation,
        act="relu",
        norm=norm_spec(norm),
        dropout=dropout or None,
        bias=False,
    )


class DoubleConv(nn.Sequential):
    """The U-Net conv block: two 3x3 conv -> norm -> ReLU, ``(B, Cin, H, W) -> (B, Cout, H, W)``.

    With ``residual=True`` it is MONAI's ``ResidualUnit`` (the same two convs plus an additive
    shortcut, a 1x1 conv when the channel count changes).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: str = "batch",
        residual: bool = False,
        dropout: float | None = None,
    ) -> None:
        if residual:
            layers: list[nn.Module] = [
                ResidualUnit(
                    spatial_dims=2,
                    in_channels=in_channels,
                    out_channels=out_channels,
                    kernel_size=3,
                    subunits=2,
                    act="relu",
                    norm=norm_spec(norm),
                    dropout=dropout or None,
                    bias=False,
                )
            ]
        else:
            layers = [
                conv_norm_act(in_channels, out_channels, norm=norm, dropout=dropout),
                conv_norm_act(out_channels, out_channels, norm=norm, dropout=dropout),
            ]
        super().__init__(*layers)
        self.in_channels = in_channels
        self.out_channels = out_channels


class SeparableConv2d(nn.Sequential):
    """Depthwise-separable conv: depthwise kxk (stride, dilation) -> norm -> ReLU -> 1x1 -> norm [-> ReLU].

    ``(B, Cin, H, W) -> (B, Cout, H / stride, W / stride)``. ``act_last=False`` leaves the final
    ReLU out (the last conv of an Xception residual block, added to the shortcut first).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        norm: str = "batch",
        act_last: bool = True,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                in_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=in_channels,
                bias=False,
            ),
            make_norm(norm, in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            make_norm(norm, out_channels),
        ]
        if act_last:
            layers.append(nn.ReLU())
        super().__init__(*layers)


def inception_widths(channels: int, fractions: Sequence[float]) -> list[int]:
    """Channel count of each inception branch: ``max(1, round(fraction * channels))``."""
    if len(fractions) != 4:
        raise ValueError(f"inception_branches needs 4 fractions (1x1, 3x3, 5x5, pool), got {list(fractions)}")
    return [max(1, round(f * channels)) for f in fractions]


class InceptionBlock(nn.Module):
    """Inception block for a skip connection; keeps the shape ``(B, C, H, W) -> (B, C, H, W)``.

    Four parallel branches (GoogLeNet style), concatenated along channels and projected back to
    ``C`` by a 1x1 conv -> norm -> ReLU:

    - ``b1``: 1x1 conv;
    - ``b3``: 1x1 reduce -> 3x3 conv;
    - ``b5``: 1x1 reduce -> two 3x3 convs (a factorised 5x5, as in Inception-v2/v3);
    - ``pool``: 3x3 max-pool (stride 1) -> 1x1 conv.

    Branch widths are ``fractions`` of ``C`` (default GoogLeNet 3a's 64/128/32/32 of 256).
    """

    def __init__(
        self,
        channels: int,
        fractions: Sequence[float] = (0.25, 0.5, 0.125, 0.125),
        norm: str = "batch",
    ) -> None:
        super().__init__()
        w1, w3, w5, wp = inception_widths(channels, fractions)
        self.b1 = conv_norm_act(channels, w1, kernel_size=1, norm=norm)
        self.b3 = nn.Sequential(
            conv_norm_act(channels, w3, kernel_size=1, norm=norm),
            conv_norm_act(w3, w3, kernel_size=3, norm=norm),
        )
        self.b5 = nn.Sequential(
            conv_norm_act(channels, w5, kernel_size=1, norm=norm),
            conv_norm_act(w5, w5, kernel_size=3, norm=norm),
            conv_norm_act(w5, w5, kernel_size=3, norm=norm),
        )
        self.pool = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1),
            conv_norm_act(channels, wp, kernel_size=1, norm=norm),
        )
        self.project = conv_norm_act(w1 + w3 + w5 + wp, channels, kernel_size=1, norm=norm)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.b1(x), self.b3(x), self.b5(x), self.pool(x)]
        return self.project(torch.cat(branches, dim=1))


class ImagePooling(nn.Module):
    """ASPP image-level branch: global average pool -> 1x1 conv (bias) -> ReLU -> upsample.

    ``(B, Cin, H, W) -> (B, Cout, H, W)``. No norm layer: a BatchNorm over ``(B, C, 1, 1)``
    fails in train mode at batch size 1, and the bias does the norm's shifting job here.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=True)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(self.pool(x)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3+), ``(B, Cin, h, w) -> (B, Cout, h, w)``.

    Five parallel branches: a 1x1 conv, three 3x3 depthwise-separable convs with dilation
    ``rates`` and the image-pooling branch; concatenated (``5 * Cout``) and projected by a
    1x1 conv -> norm -> ReLU -> dropout.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        norm: str = "batch",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(rates) != 3:
            raise ValueError(f"ASPP needs 3 atrous rates, got {list(rates)}")
        self.rates = tuple(int(r) for r in rates)
        branches: list[nn.Module] = [conv_norm_act(in_channels, out_channels, kernel_size=1, norm=norm)]
        branches += [
            SeparableConv2d(in_channels, out_channels, dilation=rate, norm=norm) for rate in self.rates
        ]
        branches.append(ImagePooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            conv_norm_act(5 * out_channels, out_channels, kernel_size=1, norm=norm),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad ``(B, C, H, W)`` at the bottom/right, repeating the edge pixels, so H and W are multiples
    of ``multiple``.

    Edge replication, not zeros: inputs are normalised images, where 0 is average tissue, so a
    zero frame beside a slice's background border looks like tissue and invites false-positive
    logits that leak into the real pixels through the receptive field. Always calls ``F.pad``
    (possibly with zero amounts) so traced/exported graphs stay valid for every input size.
    """
    h, w = x.shape[-2], x.shape[-1]
    pads = [0, (multiple - w % multiple) % multiple, 0, (multiple - h % multiple) % multiple]
    return F.pad(x, pads, mode="replicate")
