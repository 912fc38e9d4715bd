"""U-Net and Inception U-Net: any registry encoder + the classic expanding path.

``UNet.__init__`` only assembles: encoder -> ``UNetDecoder(encoder.out_channels, ...)`` -> 1x1 head.
The decoder's skip path goes through a pluggable module (``skip_block``): the identity for
``unet``, an ``InceptionBlock`` for ``unet_inception`` (where smp's decoder has ``Attention``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from medseg.models.blocks import DoubleConv, InceptionBlock
from medseg.models.encoders import Encoder, EncoderDecoder

SkipFactory = Callable[[int], nn.Module]


class UpBlock(nn.Module):
    """One expanding step: 2x2 stride-2 transposed conv, concat the skip, double conv.

    ``x: (B, Cin, h, w)``, ``skip: (B, Cskip, 2h, 2w)`` (or None) -> ``(B, Cout, 2h, 2w)``.
    The skip first goes through ``skip_block`` (``(B, Cskip, H, W) -> (B, Cskip, H, W)``);
    the conv block sees ``cat([skip_block(skip), up(x)])``.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        skip_block: nn.Module | None,
        norm: str,
        residual: bool,
        dropout: float | None,
    ) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.skip_block = skip_block if skip_block is not None else nn.Identity()
        self.conv = DoubleConv(
            skip_channels + out_channels, out_channels, norm=norm, residual=residual, dropout=dropout
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([self.skip_block(skip), x], dim=1)
        return self.conv(x)


def default_decoder_channels(encoder_channels: Sequence[int], n_blocks: int) -> list[int]:
    """Classic rule: each transposed conv halves the channels, starting from the bottleneck's."""
    channels, c = [], encoder_channels[-1]
    for _ in range(n_blocks):
        c = max(1, c // 2)
        channels.append(c)
    return channels


class UNetDecoder(nn.Module):
    """Expanding path over an encoder's feature list.

    ``features``: ``[(B, encoder_channels[i], H / strides[i], W / strides[i])]`` with strides
    doubling from ``strides[0]`` (1 or 2) to the bottleneck. One ``UpBlock`` per skip, deepest
    first, plus skip-less up blocks until stride 1 (ResNet/Xception features start at stride 2).
    Output: ``(B, decoder_channels[-1], H, W)``.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        strides: Sequence[int],
        decoder_channels: Sequence[int] | None = None,
        skip_factory: SkipFactory | None = None,
        norm: str = "batch",
        residual: bool = False,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        extra = int(strides[0]).bit_length() - 1  # up blocks without a skip, to reach stride 1
        n_blocks = len(encoder_channels) - 1 + extra
        if decoder_channels is None:
            decoder_channels = default_decoder_channels(encoder_channels, n_blocks)
        if len(decoder_channels) != n_blocks:
            raise ValueError(
                f"decoder_channels needs {n_blocks} values for this encoder (one per up block, "
                f"deepest first), got {list(decoder_channels)}"
            )
        skips = list(encoder_channels[-2::-1]) + [0] * extra
        blocks, in_ch = [], encoder_channels[-1]
        for skip_ch, out_ch in zip(skips, decoder_channels, strict=True):
            skip_block = skip_factory(skip_ch) if (skip_factory is not None and skip_ch) else None
            blocks.append(UpBlock(in_ch, skip_ch, out_ch, skip_block, norm, residual, dropout))
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = in_ch

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        skips = features[-2::-1]
        for i, block in enumerate(self.blocks):
            x = block(x, skips[i] if i < len(skips) else None)
        return x


class UNet(EncoderDecoder):
    """Encoder -> U-Net decoder -> 1x1 conv head; ``(B, Cin, H, W) -> (B, out_channels, H, W)`` logits.

    Any ``H x W``: the input is edge-padded (bottom/right) to a multiple of the encoder's
    deepest stride and the logits are cropped back (:class:`EncoderDecoder`); the decoder
    (:class:`UNetDecoder`) ends at full resolution.
    """


def build_unet(
    encoder: Encoder,
    out_channels: int,
    decoder_channels: Sequence[int] | None = None,
    residual: bool = False,
    norm: str = "batch",
    dropout: float | None = None,
) -> UNet:
    """Classic U-Net decoder on ``encoder`` (identity skip connections)."""
    return _unet(encoder, out_channels, decoder_channels, None, norm, residual, dropout)


def build_unet_inception(
    encoder: Encoder,
    out_channels: int,
    decoder_channels: Sequence[int] | None = None,
    residual: bool = False,
    norm: str = "batch",
    dropout: float | None = None,
    inception_branches: Sequence[float] = (0.25, 0.5, 0.125, 0.125),
) -> UNet:
    """U-Net with an ``InceptionBlock`` on every skip connection (branch widths as fractions)."""
    return _unet(encoder, out_channels, decoder_channels,
                 lambda channels: InceptionBlock(channels, inception_branches, norm=norm), norm, residual, dropout)  # fmt: skip


def _unet(encoder: Encoder, out_channels: int, decoder_channels: Sequence[int] | None, skip_factory: SkipFactory | None,
          norm: str, residual: bool, dropout: float | None) -> UNet:  # fmt: skip
    """The U-Net both builders assemble (they differ only in ``skip_factory``)."""
    decoder = UNetDecoder(encoder.out_channels, encoder.strides, decoder_channels, skip_factory=skip_factory,
                          norm=norm, residual=residual, dropout=dropout)  # fmt: skip
    return UNet(encoder, decoder, out_channels)
