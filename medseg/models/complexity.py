"""Model complexity: parameter count, GFLOPs per slice, theoretical receptive field.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products;
a multiply-add counts as 2 FLOPs; norms and activations are not counted).

The receptive field is computed exactly from the operations a forward pass really runs: a
``TorchDispatchMode`` follows every aten op and propagates, per tensor, its receptive field
``r`` and jump ``j`` (input pixels between neighbouring feature pixels), starting from
``r = j = 1`` on the input:

- convolution ``k``/stride ``s``/dilation ``d`` and max/avg pooling: ``r += (k - 1) d j``, ``j *= s``;
- transposed convolution: ``j /= s``, ``r += (ceil(k / s) - 1) j_out``;
- bilinear/bicubic upsampling: ``j /= f``, ``r += j_in`` (each output reads 2 neighbours);
- reduction to 1x1 (global pooling): the tensor depends on the whole image (``global``);
  its conv-path ``r`` is 0, so the reported ``r`` is that of the convolutional paths;
- everything else (add, concat, norm, activation, pad, crop) takes the max over its inputs.

Normalisation statistics (instance norm) are ignored, as usual for a *theoretical* RF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_gflops(model: nn.Module, in_channels: int, height: int = 256, width: int = 256) -> float:
    """GFLOPs of one forward pass on a single ``(1, in_channels, height, width)`` slice (eval mode)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(1, in_channels, height, width))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


@dataclass(frozen=True)
class ReceptiveField:
    """Theoretical receptive field of one output pixel, in input pixels.

    ``pixels``: extent of the convolutional paths; ``global_pooling``: True when some path
    (e.g. DeepLab's ASPP image pooling) sees the whole image.
    """

    pixels: float
    global_pooling: bool
    roi: bool = False  # an instance model: ``pixels`` is its finest FPN level's; the heads see each whole RoI

    def __str__(self) -> str:
        text = f"{self.pixels:g}"
        text = f"{text} + global" if self.global_pooling else text
        return f"{text} + RoI" if self.roi else text


@dataclass(frozen=True)
class _Meta:
    r: float
    j: float
    glob: bool = False


def _spatial(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape[2:]) if t.ndim == 4 else ()


class _ReceptiveFieldMode(TorchDispatchMode):
    """Propagates ``_Meta`` through every aten op (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.meta: dict[int, tuple[torch.Tensor, _Meta]] = {}

    def get(self, t: Any) -> _Meta | None:
        if isinstance(t, torch.Tensor) and id(t) in self.meta and self.meta[id(t)][0] is t:
            return self.meta[id(t)][1]
        return None

    def set(self, t: torch.Tensor, m: _Meta) -> None:
        self.meta[id(t)] = (t, m)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        metas = [(t, m) for t in flat_in if (m := self.get(t)) is not None]
        if not metas:
            return out
        src, base = max(metas, key=lambda tm: (tm[1].r, tm[1].j))
        glob = any(m.glob for _, m in metas)
        j = max(m.j for _, m in metas)
        new = _Meta(base.r, j, glob)
        name = func.overloadpacket.__name__
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        first = outs[0] if outs else None
        if name == "convolution":
            weight, stride, dilation, transposed = args[1], args[3], args[5], args[6]
            k, s, d = weight.shape[-1], stride[-1], dilation[-1]
            if transposed:
                j_out = base.j / s
                new = _Meta(base.r + (math.ceil((d * (k - 1) + 1) / s) - 1) * j_out, j_out, glob)
            else:
                new = _Meta(base.r + (k - 1) * d * base.j, base.j * s, glob)
        elif name in ("max_pool2d_with_indices", "max_pool2d", "avg_pool2d"):
            k = args[1][-1] if isinstance(args[1], (list, tuple)) else args[1]
            stride = args[2] if len(args) > 2 and args[2] else args[1]
            s = stride[-1] if isinstance(stride, (list, tuple)) else stride
            d = 1
            if name != "avg_pool2d" and len(args) > 4:
                d = args[4][-1] if isinstance(args[4], (list, tuple)) else args[4]
            new = _Meta(base.r + (k - 1) * d * base.j, base.j * s, glob)
        elif first is not None and _spatial(src) and _spatial(first):
            sin, sout = _spatial(src), _spatial(first)
            if sout == (1, 1) and sin != (1, 1):  # global pooling / reduction
                new = _Meta(0.0, 0.0, True)
            elif sout[-1] > sin[-1] and "upsample" in name:
                factor = sout[-1] / sin[-1]
                extra = 0.0 if "nearest" in name else base.j
                new = _Meta(base.r + extra, base.j / factor, glob)
        for t in outs:
            self.set(t, new)
        return out


def receptive_field(model: nn.Module, in_channels: int, size: int = 64) -> ReceptiveField:
    """Theoretical receptive field of ``model``'s output, traced on a ``size x size`` input (eval mode).

    The value does not depend on ``size`` (it may exceed it); ``size`` only has to be a valid input.
    For an instance model (a ``pyramid`` method: Mask R-CNN) it is the finest FPN level's, marked
    ``+ RoI``: the box and mask heads pool each whole proposal box from it.
    """
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_channels, size, size)
    mode = _ReceptiveFieldMode()
    pyramid = getattr(model, "pyramid", None)  # Mask R-CNN: the dense part ends at the FPN
    try:
        with torch.no_grad(), mode:
            mode.set(x, _Meta(1.0, 1.0))
            y = pyramid(x)[0] if pyramid is not None else model(x)
            meta = mode.get(y)
    finally:
        model.train(was_training)
    if meta is None:
        raise RuntimeError("receptive field: the output does not depend on the input")
    return ReceptiveField(pixels=meta.r, global_pooling=meta.glob, roi=pyramid is not None)
