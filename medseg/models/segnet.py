"""SegNet (Badrinarayanan et al. 2017; DeconvNet's decoder idea): the decoder upsamples with the
encoder's **max-pooling indices**, then convolves -- no skip concatenation.

Encoder: the registry encoder whose stages after the first each start with a ``MaxPool2d``
(the VGG-like ``unet`` encoder: double 3x3 conv blocks and 2x2 max-pools; SegNet's own VGG-16
has two or three convs per block). Each pool runs with ``return_indices=True``; the decoder
mirrors it::

    features f0..f4 (strides 1, 2, 4, 8, 16, channels c0..c4) -- pools with indices i1..i4 between
    x = f4 -> DoubleConv to c3 -> unpool(i4) -> DoubleConv to c2 -> unpool(i3) -> ... -> unpool(i1)
      -> DoubleConv c0 -> 1x1 head

Max-unpooling (:class:`MaxUnpool2x`) puts each value back at the position its max came from (zeros elsewhere): the
boundaries the encoder saw survive the upsampling without storing the feature maps (SegNet's
memory argument against U-Net's skips). Encoders that downsample with strided convolutions
(ResNet, Xception) have no pooling indices and are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.blocks import DoubleConv, pad_to_multiple
from medseg.models.encoders import Encoder


def pooling_stages(encoder: Encoder) -> list[nn.MaxPool2d]:
    """The leading ``MaxPool2d`` of every stage after the first; ValueError when a stage has none."""
    pools = []
    for i, stage in enumerate(encoder.stages):
        if i == 0:
            continue
        first = stage[0] if isinstance(stage, nn.Sequential) and len(stage) else None
        if not isinstance(first, nn.MaxPool2d):
            raise ValueError("segnet needs an encoder that downsamples by max-pooling (encoder unet); stage "
                             f"{i} of this encoder downsamples otherwise (no pooling indices)")
        pools.append(first)
    return pools


class MaxUnpool2x(nn.Module):
    """``nn.MaxUnpool2d(2)`` as a scatter: ``(B, C, h, w)`` values and the flat indices a 2x2/2
    max-pool returned -> ``(B, C, 2h, 2w)``, each value at its max's position, zeros elsewhere.
    Written with ``scatter`` so it traces/exports at any size and is deterministic (PyTorch's
    unpooling kernel is flagged non-deterministic and checks its output size eagerly)."""

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        out = x.new_zeros((b, c, 4 * h * w))
        return out.scatter(2, indices.flatten(2), x.flatten(2)).view(b, c, 2 * h, 2 * w)


class SegNet(nn.Module):
    """``(B, Cin, H, W) -> (B, out_channels, H, W)`` logits; any H, W (edge-padded to the
    deepest stride and cropped back)."""

    def __init__(self, encoder: Encoder, out_channels: int, norm: str = "batch", dropout: float | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.pools = pooling_stages(encoder)
        channels = encoder.out_channels
        self.unpool = MaxUnpool2x()
        # decoder block for level i (deepest first) convolves at level i's resolution down to the
        # channels level i's pool received, so its indices fit; then the unpooling goes up a level
        self.blocks = nn.ModuleList(
            DoubleConv(channels[i], channels[i - 1], norm=norm, dropout=dropout) for i in reversed(range(1, len(channels)))
        )
        self.last = DoubleConv(channels[0], channels[0], norm=norm, dropout=dropout)
        self.head = nn.Conv2d(channels[0], out_channels, kernel_size=1)
        self.multiple = max(encoder.strides)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Deepest feature and the pooling indices of every pooled stage (shallowest first).
        ``x``'s size is a multiple of the deepest stride, so every 2x2 pool halves it exactly and
        its unpooling restores the size without an explicit output size (traceable)."""
        indices = []
        for i, stage in enumerate(self.encoder.stages):
            if i == 0:
                x = stage(x)
                continue
            pool = stage[0]
            x, index = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                    ceil_mode=pool.ceil_mode, return_indices=True)  # fmt: skip
            indices.append(index)
            x = stage[1:](x)
        return x, indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        x, indices = self.encode(pad_to_multiple(x, self.multiple))
        for block, index in zip(self.blocks, reversed(indices), strict=True):
            x = self.unpool(block(x), index)
        return self.head(self.last(x))[..., :h, :w]


def build_segnet(encoder: Encoder, out_channels: int, norm: str = "batch", dropout: float | None = None) -> SegNet:
    """SegNet decoder (max-unpooling with the encoder's indices + convs) on ``encoder``."""
    return SegNet(encoder, out_channels, norm=norm, dropout=dropout)
