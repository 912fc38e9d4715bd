"""Helpers of the inference tests: identity-like models and CT phantoms (tiny checkpoints: tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medseg.config import Config, InferenceConfig, PreprocessConfig
from medseg.inference.runner import InferenceBundle

BODY_HU, LESION_HU, AIR_HU = 0, 200, -1000
# CT window (-160, 240) -> body 0.4, lesion 0.9 after normalisation; the identity cuts at 0.65
CT_LEVEL = 0.65


class ChannelThreshold(nn.Module):
    """Identity-like model: logits = gain * (x[:, channel] - level), (B, Cin, H, W) -> (B, 1, H, W).

    With the channel of the centre slice it reproduces a binary image through the whole
    2.5D pipeline; a weight makes ``.parameters()`` non-empty like a real model.
    """

    def __init__(self, channel: int, level: float, gain: float = 40.0) -> None:
        super().__init__()
        self.channel, self.level = channel, level
        self.gain = nn.Parameter(torch.tensor(float(gain)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * (x[:, self.channel : self.channel + 1] - self.level)


def ct_phantom(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(I, J, K) int16 CT with air around a body box and three lesions; returns (image, lesion mask)."""
    image = np.full(shape, AIR_HU, np.int16)
    i, j, k = shape
    image[3 : i - 3, 2 : j - 4, 1 : k - 1] = BODY_HU
    lesion = np.zeros(shape, np.uint8)
    lesion[6:12, 5:9, 2:5] = 1
    lesion[i - 10 : i - 6, j - 10 : j - 7, k - 4 : k - 2] = 1
    centre = (rng.integers(12, i - 12), rng.integers(10, j - 12), k // 2)
    lesion[centre[0] : centre[0] + 2, centre[1], centre[2]] = 1  # a thin 2-voxel lesion
    image[lesion > 0] = LESION_HU
    return image, lesion


def identity_bundle(context: int = 1, n_channels: int = 1, preprocess: PreprocessConfig | None = None,
                    inference: InferenceConfig | None = None, modality: str = "CT") -> InferenceBundle:
    """A bundle whose model reproduces channel 0 of the centre slice (thresholded at ``CT_LEVEL``)."""
    centre = context * n_channels  # neighbour-major: the centre slice's channel 0
    config = Config(
        preprocess=preprocess or PreprocessConfig(context_slices=context, crop_margin=2, crop_margin_slices=1),
        inference=inference or InferenceConfig(min_lesion_mm3=0.0),
    )
    channels = ["ct"] if n_channels == 1 else [f"c{i}" for i in range(n_channels)]
    return InferenceBundle([ChannelThreshold(centre, CT_LEVEL).eval()], config, channels, modality, [], torch.device("cpu"))

