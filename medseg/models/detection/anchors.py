"""Anchors for the region proposal network, sized from the dataset's lesions.

``anchor_sizes(diameters_px, levels)`` spreads one anchor size per FPN level geometrically
from the 5th to the 95th percentile of the training lesions' in-plane diameters (pixels at
training resolution, one entry per 2-D lesion instance), at least :data:`MIN_ANCHOR` pixels and
a factor 2 apart at the ends; each size gets the aspect ratios ``ratios`` (h / w). Lesions are
small and round compared with the objects Mask R-CNN was designed for (COCO anchors 32-512 px),
so anchors from the data put positives where the lesions are.

``grid_anchors``: for an FPN level with stride ``t`` and an ``h x w`` feature map, anchors
centred on every feature pixel's centre in the image, ``((j + 0.5) t, (i + 0.5) t)``, ordered
(row, column, anchor) -- the order the RPN head's outputs are flattened in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MIN_ANCHOR = 4.0
DEFAULT_RATIOS = (0.5, 1.0, 2.0)


def anchor_sizes(diameters_px: Sequence[float], levels: int) -> list[float]:
    """One anchor size (pixels, square-equivalent side) per FPN level, smallest first."""
    values = np.asarray([d for d in diameters_px if d > 0], dtype=np.float64)
    if values.size == 0:
        low, high = 8.0, 64.0
    else:
        low, high = float(np.percentile(values, 5)), float(np.percentile(values, 95))
    low = max(low, MIN_ANCHOR)
    high = max(high, 2 * low)
    return [float(v) for v in np.geomspace(low, high, levels)]


def cell_anchors(size: float, ratios: Sequence[float] = DEFAULT_RATIOS) -> torch.Tensor:
    """(A, 4) anchors of area ``size**2`` and aspect ratios h / w = ``ratios``, centred on (0, 0)."""
    r = torch.as_tensor(ratios, dtype=torch.float32)
    h = size * torch.sqrt(r)
    w = size / torch.sqrt(r)
    return torch.stack([-w / 2, -h / 2, w / 2, h / 2], dim=1)


def grid_anchors(height: int, width: int, stride: int, cells: torch.Tensor) -> torch.Tensor:
    """(height * width * A, 4) anchors of one level (module docstring)."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
    return (centres + cells[None]).reshape(-1, 4)
