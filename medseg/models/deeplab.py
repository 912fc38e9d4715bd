"""DeepLabv3+ (Chen et al., 2018): atrous encoder -> ASPP -> decoder fusing 1/4-resolution features.

Feature-map sizes for an input padded to ``H x W`` (a multiple of ``output_stride``):

- encoder's last feature and ASPP output: ``(B, C, H / output_stride, W / output_stride)``
  (16x16 at OS16, 32x32 at OS8 for a 256x256 slice);
- low-level feature (the encoder's stride-4 map): ``(B, C_low, H / 4, W / 4)``, reduced to
  ``low_level_channels`` by a 1x1 conv;
- decoder: ASPP output upsampled (bilinear) to ``H / 4``, concatenated with the reduced
  low-level feature, two 3x3 separable convs -> ``(B, aspp_channels, H / 4, W / 4)``;
- head: 1x1 conv, bilinear upsampling x4 -> logits ``(B, out_channels, H, W)``, cropped to the
  unpadded input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.blocks import ASPP, SeparableConv2d, conv_norm_act
from medseg.models.encoders import Encoder, EncoderDecoder, scale_channels

# atrous rates used when the config gives none (the paper's: doubled at output stride 8)
DEFAULT_RATES: dict[int, tuple[int, int, int]] = {16: (6, 12, 18), 8: (12, 24, 36)}


class DeepLabV3PlusDecoder(nn.Module):
    """ASPP on the deepest feature + fusion with the stride-4 feature.

    ``features``: the encoder's list; uses ``features[low_index]`` (stride 4) and ``features[-1]``.
    Output: ``(B, aspp_channels, H / 4, W / 4)``.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        low_index: int,
        aspp_channels: int,
        low_level_channels: int,
        rates: Sequence[int],
        norm: str,
        dropout: float,
    ) -> None:
        super().__init__()
        self.low_index = low_index
        self.aspp = ASPP(encoder_channels[-1], aspp_channels, rates, norm=norm, dropout=dropout)
        self.reduce = conv_norm_act(encoder_channels[low_index], low_level_channels, kernel_size=1, norm=norm)
        self.fuse = nn.Sequential(
            SeparableConv2d(aspp_channels + low_level_channels, aspp_channels, norm=norm),
            SeparableConv2d(aspp_channels, aspp_channels, norm=norm),
        )
        self.out_channels = aspp_channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        low = self.reduce(features[self.low_index])
        high = self.aspp(features[-1])
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([high, low], dim=1))


class DeepLabV3Plus(EncoderDecoder):
    """Atrous encoder -> DeepLabv3+ decoder -> 1x1 head -> bilinear x4.

    ``(B, Cin, H, W) -> (B, out_channels, H, W)`` logits for any ``H x W`` (padded internally
    to a multiple of the output stride, cropped back: :class:`EncoderDecoder`).
    """

    def to_input_size(self, logits: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """The head's ``(B, out_channels, H / 4, W / 4)`` upsampled (bilinear) to the padded size."""
        return F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)

def build_deeplabv3plus(
    encoder: Encoder,
    out_channels: int,
    output_stride: int = 16,
    aspp_rates: Sequence[int] | None = None,
    aspp_channels: int | None = None,
    width: float = 1.0,
    norm: str = "batch",
    dropout: float = 0.1,
) -> DeepLabV3Plus:
    """DeepLabv3+ on ``encoder`` dilated to ``output_stride`` (8 or 16).

    ``aspp_rates`` default to 6/12/18 at OS16 and 12/24/36 at OS8; ``aspp_channels`` (ASPP and
    decoder width) to ``256 * width``; the low-level projection has ``48 * width`` channels.
    """
    if output_stride not in DEFAULT_RATES:
        raise ValueError(f"output_stride must be one of {sorted(DEFAULT_RATES)}, got {output_stride}")
    if 4 not in encoder.strides:
        raise ValueError(
            f"DeepLabv3+ needs a stride-4 encoder feature; encoder strides are {encoder.strides}"
        )
    encoder.set_output_stride(output_stride)
    decoder = DeepLabV3PlusDecoder(
        encoder.out_channels,
        low_index=encoder.strides.index(4),
        aspp_channels=aspp_channels or scale_channels(256, width),
        low_level_channels=scale_channels(48, width),
        rates=aspp_rates or DEFAULT_RATES[output_stride],
        norm=norm,
        dropout=dropout,
    )
    return DeepLabV3Plus(encoder, decoder, out_channels)
