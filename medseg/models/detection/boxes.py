"""Box arithmetic: IoU, the Faster R-CNN box encoding, greedy NMS, boxes of masks.

Boxes: ``(N, 4)`` float ``(x1, y1, x2, y2)`` in pixel-edge coordinates (package docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# a decoded width/height is at most exp(this) times its reference (Detectron's clamp: 1000/16)
MAX_LOG_SCALE = math.log(1000.0 / 16)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) -> (N,) areas (0 for empty boxes)."""
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4), (M, 4) -> (N, M) intersection over union (0 where both are empty)."""
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes clipped to the image ``[0, width] x [0, height]``."""
    x = boxes[:, 0::2].clamp(0, width)
    y = boxes[:, 1::2].clamp(0, height)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)


@dataclass(frozen=True)
class BoxCoder:
    """Faster R-CNN box deltas relative to reference boxes (anchors or proposals):
    ``dx = wx (cx - cx_ref) / w_ref``, ``dy = wy (cy - cy_ref) / h_ref``, ``dw = ww log(w / w_ref)``,
    ``dh = wh log(h / h_ref)``. ``weights``: (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for the box head."""

    weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)

    def encode(self, boxes: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """(N, 4) target boxes, (N, 4) references -> (N, 4) deltas."""
        wx, wy, ww, wh = self.weights
        rw, rh = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
        rx, ry = reference[:, 0] + 0.5 * rw, reference[:, 1] + 0.5 * rh
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        bx, by = boxes[:, 0] + 0.5 * bw, boxes[:, 1] + 0.5 * bh
        return torch.stack([wx * (bx - rx) / rw, wy * (by - ry) / rh, ww * torch.log(bw / rw), wh * torch.log(bh / rh)], 1)

    def decode(self, deltas: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """(N, 4) deltas, (N, 4) references -> (N, 4) boxes (inverse of :meth:`encode`; the
        scale deltas are clamped at :data:`MAX_LOG_SCALE`)."""
        wx, wy, ww, wh = self.weights
        rw, rh = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
        rx, ry = reference[:, 0] + 0.5 * rw, reference[:, 1] + 0.5 * rh
        cx, cy = rx + deltas[:, 0] / wx * rw, ry + deltas[:, 1] / wy * rh
        w = rw * torch.exp((deltas[:, 2] / ww).clamp(max=MAX_LOG_SCALE))
        h = rh * torch.exp((deltas[:, 3] / wh).clamp(max=MAX_LOG_SCALE))
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], 1)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, limit: int | None = None) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first. A box is
    dropped when its IoU with a kept, higher-scoring box exceeds ``iou_threshold``; with
    ``limit``, suppression stops once that many boxes are kept (the same first ``limit``)."""
    order = torch.argsort(scores, descending=True)
    if order.numel() == 0:
        return order
    # the greedy loop reads one flag per box: on the host, in numpy (a tensor flag costs ~10x more)
    iou = box_iou(boxes[order], boxes[order]).cpu().numpy()
    suppressed = np.zeros(order.numel(), dtype=bool)
    keep: list[int] = []
    for i in range(order.numel()):
        if suppressed[i]:
            continue
        keep.append(i)
        if limit is not None and len(keep) >= limit:
            break
        suppressed |= iou[i] > iou_threshold
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) binary masks -> (N, 4) tight boxes in pixel-edge coordinates (pixels c0..c1 ->
    x1 = c0, x2 = c1 + 1). Empty masks give a zero box."""
    out = torch.zeros((masks.shape[0], 4), dtype=torch.float32, device=masks.device)
    for n, mask in enumerate(masks):
        rows, cols = torch.nonzero(mask, as_tuple=True)
        if rows.numel():
            out[n] = torch.stack([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).float()
    return out
