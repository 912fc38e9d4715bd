"""Anti-aliased downsampling (Zhang, "Making Convolutional Networks Shift-Invariant Again", 2019).

A stride-2 max-pool or conv keeps every second sample of its output, so what the network
computes depends on where the image sits on that sampling grid: the encoders here halve the
resolution five times, and a trained BraTS U-Net's mask changed by Dice 0.027 when the slice
moved 16 pixels (half the stride-32 period) but only by 0.003 when it moved 32 pixels (the
same phase, with 32 more rows of padding) -- ``benchmarks/position_sensitivity.py``. Blurring
before the subsampling removes the frequencies that alias:

- ``MaxBlurPool2d``: the max over the same window at stride 1 (dense), then a 3x3 binomial blur
  at the pool's stride -- still a 2x2 (or 3x3) max-pool, evaluated everywhere before it is
  subsampled;
- ``BlurConv2d``: a 3x3 binomial blur at stride 1, then the strided conv (for a linear conv this
  equals the conv at stride 1 followed by blur-subsampling, at the cost of a depthwise blur).

``antialias_downsampling(module)`` swaps them in for every stride-2 ``nn.MaxPool2d`` and
``nn.Conv2d`` inside ``module`` (in place). Output shapes and state-dict keys are unchanged
(the blur kernel is a fixed, non-persistent buffer), so a checkpoint stores the flag in its
config (``model.antialias``) and loads into a model built with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BINOMIAL = torch.tensor([1.0, 2.0, 1.0])


def binomial_kernel() -> torch.Tensor:
    """(1, 1, 3, 3) normalised binomial low-pass ([1, 2, 1] outer [1, 2, 1] / 16)."""
    return (torch.outer(_BINOMIAL, _BINOMIAL) / 16.0)[None, None]


def blur(x: torch.Tensor, kernel: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, ceil(H / stride), ceil(W / stride)): depthwise binomial blur with
    edge-replicated borders, keeping every ``stride``-th sample."""
    channels = x.shape[1]
    weight = kernel.to(dtype=x.dtype, device=x.device).expand(channels, 1, 3, 3)
    return F.conv2d(F.pad(x, [1, 1, 1, 1], mode="replicate"), weight, stride=stride, groups=channels)


def _stride(value: int | tuple[int, ...]) -> int:
    return value if isinstance(value, int) else int(value[0])


class MaxBlurPool2d(nn.MaxPool2d):
    """Max over ``kernel_size`` at stride 1, then blur-subsample by ``stride`` (same output size
    as ``nn.MaxPool2d(kernel_size, stride, padding)`` for even input sizes)."""

    def __init__(self, kernel_size: int, stride: int, padding: int = 0) -> None:
        super().__init__(kernel_size, stride=stride, padding=padding)
        self.register_buffer("blur_kernel", binomial_kernel(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = F.max_pool2d(x, self.kernel_size, stride=1, padding=self.padding)
        return blur(dense, self.blur_kernel, _stride(self.stride))


class BlurConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose input is low-passed (3x3 binomial, stride 1) before the strided conv."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - nn.Conv2d's signature
        super().__init__(*args, **kwargs)
        self.register_buffer("blur_kernel", binomial_kernel(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(blur(x, self.blur_kernel, 1))


def _replacement(module: nn.Module) -> nn.Module | None:
    if isinstance(module, (MaxBlurPool2d, BlurConv2d)):
        return None
    if isinstance(module, nn.MaxPool2d) and _stride(module.stride) == 2:
        if module.dilation not in (1, (1, 1)) or module.ceil_mode:
            raise ValueError("anti-aliasing supports plain max-pools (no dilation, no ceil_mode)")
        return MaxBlurPool2d(module.kernel_size, 2, module.padding)
    if isinstance(module, nn.Conv2d) and tuple(module.stride) == (2, 2):
        conv = BlurConv2d(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups,
            bias=module.bias is not None, padding_mode=module.padding_mode,
        )
        conv.load_state_dict(module.state_dict())
        return conv.to(module.weight.device, module.weight.dtype)
    return None


def antialias_downsampling(module: nn.Module) -> int:
    """In place: every stride-2 max-pool / conv in ``module`` becomes its anti-aliased twin.

    Returns how many were replaced. Apply after anything that changes strides (DeepLab's
    ``set_output_stride``): layers that no longer subsample are left alone.
    """
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            new = _replacement(child)
            if new is not None:
                setattr(parent, name, new)
                replaced += 1
    return replaced
