"""RoIAlign (He et al., Mask R-CNN): bilinear, sub-pixel sampling of a feature map inside boxes,
no quantisation of box or bin edges.

Each box is divided into ``output_size x output_size`` bins; each bin averages
``sampling_ratio x sampling_ratio`` regularly spaced samples, each a bilinear interpolation of
the four nearest feature pixels. ``aligned=True`` (Detectron2's default) shifts the box by half a
pixel so that feature pixel ``j`` is centred at continuous coordinate ``j`` (boxes are in
pixel-edge coordinates, package docstring). Samples more than one pixel outside the map are 0;
within that pixel they take the border value (torchvision's rule). Implemented with
``grid_sample`` (``align_corners=True`` maps coordinate ``j`` to pixel ``j`` exactly), one call
per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def roi_align(
    features: torch.Tensor,
    boxes: torch.Tensor,
    batch_index: torch.Tensor,
    output_size: int,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> torch.Tensor:
    """``features`` (B, C, H, W), ``boxes`` (R, 4) in image pixel-edge coordinates, ``batch_index``
    (R,) the image of each box -> (R, C, output_size, output_size).

    ``spatial_scale``: feature pixels per image pixel (1 / stride). Computed in float32 (under
    autocast too): the output is float32."""
    features = features.float()  # sampling positions in bf16/fp16 would be off by up to a pixel: float32 always
    n_boxes = boxes.shape[0]
    _, channels, height, width = features.shape
    out = features.new_zeros((n_boxes, channels, output_size, output_size))
    if n_boxes == 0:
        return out
    p, s = output_size, sampling_ratio
    offset = 0.5 if aligned else 0.0
    scaled = boxes.to(features.dtype) * spatial_scale - offset
    x1, y1, x2, y2 = scaled.unbind(1)
    bin_w, bin_h = (x2 - x1) / p, (y2 - y1) / p
    if not aligned:  # Detectron v1: boxes at least one pixel wide
        bin_w, bin_h = (x2 - x1).clamp(min=1) / p, (y2 - y1).clamp(min=1) / p
    # sample positions along one box side: bin b, sample i -> (b + (i + 0.5) / s) bin sizes
    steps = (torch.arange(p * s, dtype=features.dtype, device=features.device) + 0.5) / s  # (P*s,)
    xs = x1[:, None] + steps[None] * bin_w[:, None]  # (R, P*s)
    ys = y1[:, None] + steps[None] * bin_h[:, None]
    for b in torch.unique(batch_index).tolist():
        sel = torch.nonzero(batch_index == b, as_tuple=True)[0]
        gx, gy = xs[sel], ys[sel]  # (r, P*s)
        grid_x = gx[:, None, :].expand(-1, p * s, -1)
        grid_y = gy[:, :, None].expand(-1, -1, p * s)
        inside = (grid_x >= -1) & (grid_x <= width) & (grid_y >= -1) & (grid_y <= height)
        norm_x = 2 * grid_x.clamp(0, width - 1) / max(width - 1, 1) - 1
        norm_y = 2 * grid_y.clamp(0, height - 1) / max(height - 1, 1) - 1
        grid = torch.stack([norm_x, norm_y], dim=-1).reshape(1, -1, p * s, 2)  # (1, r*P*s, P*s, 2)
        sampled = F.grid_sample(features[b:b + 1], grid, mode="bilinear", padding_mode="border", align_corners=True)
        sampled = sampled.reshape(channels, len(sel), p * s, p * s).permute(1, 0, 2, 3)
        sampled = sampled * inside[:, None].to(sampled.dtype)
        out[sel] = F.avg_pool2d(sampled, s) if s > 1 else sampled  # mean of each bin's s x s samples
    return out
