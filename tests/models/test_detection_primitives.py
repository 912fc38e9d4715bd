"""Detection building blocks on plain torch: RoIAlign against hand-computed bilinear samples and a
direct transcription of the reference algorithm, box encoding round trip, IoU/NMS, anchors."""

from __future__ import annotations

import math

import pytest
import torch

from medseg.models.detection.anchors import anchor_sizes, cell_anchors, grid_anchors
from medseg.models.detection.boxes import BoxCoder, box_iou, clip_boxes, masks_to_boxes, nms
from medseg.models.detection.roi_align import roi_align


def bilinear_reference(f: torch.Tensor, y: float, x: float) -> float:
    """The reference RoIAlign's bilinear sample of the (H, W) map ``f`` at continuous (y, x)."""
    h, w = f.shape
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_low = y_high = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_low = x_high = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return float(hy * hx * f[y_low, x_low] + hy * lx * f[y_low, x_high] + ly * hx * f[y_high, x_low]
                 + ly * lx * f[y_high, x_high])  # fmt: skip


def roi_align_reference(f, box, size, scale, ratio, aligned):
    """Direct loops over bins and samples (Mask R-CNN's RoIAlign as Detectron2 defines it)."""
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (v * scale - offset for v in box)
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    bw, bh = rw / size, rh / size
    out = torch.zeros(size, size)
    for py in range(size):
        for px in range(size):
            total = 0.0
            for iy in range(ratio):
                for ix in range(ratio):
                    y = y1 + py * bh + (iy + 0.5) * bh / ratio
                    x = x1 + px * bw + (ix + 0.5) * bw / ratio
                    total += bilinear_reference(f, y, x)
            out[py, px] = total / ratio**2
    return out


def test_one_sample_is_the_hand_computed_bilinear_value():
    torch.manual_seed(0)
    f = torch.rand(1, 1, 4, 5)
    # box centre (x, y) = (3.0, 1.75) image pixels -> (2.5, 1.25) in pixel-centre coordinates
    out = roi_align(f, torch.tensor([[2.2, 1.0, 3.8, 2.5]]), torch.tensor([0]), output_size=1, sampling_ratio=1)
    g = f[0, 0]
    wy, wx = 0.25, 0.5  # between rows 1-2 and columns 2-3
    expected = (1 - wy) * (1 - wx) * g[1, 2] + (1 - wy) * wx * g[1, 3] + wy * (1 - wx) * g[2, 2] + wy * wx * g[2, 3]
    assert out.shape == (1, 1, 1, 1)
    assert out.item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("aligned", [True, False])
def test_matches_the_reference_algorithm_inside_and_at_the_border(aligned):
    torch.manual_seed(1)
    features = torch.rand(2, 3, 9, 11)
    boxes = torch.tensor([[1.3, 2.2, 9.7, 8.1], [0.0, 0.0, 22.0, 18.0], [-3.0, 5.0, 4.0, 21.0], [10.2, 3.3, 10.9, 3.8],
                          [15.5, 12.5, 30.0, 25.0]])  # fmt: skip
    index = torch.tensor([0, 1, 1, 0, 0])
    out = roi_align(features, boxes, index, output_size=3, spatial_scale=0.5, sampling_ratio=2, aligned=aligned)
    for r in range(len(boxes)):
        for c in range(3):
            expected = roi_align_reference(features[index[r], c], boxes[r].tolist(), 3, 0.5, 2, aligned)
            torch.testing.assert_close(out[r, c], expected, atol=1e-5, rtol=0)


def test_roi_align_is_differentiable_and_empty_safe():
    features = torch.rand(1, 2, 8, 8, requires_grad=True)
    out = roi_align(features, torch.tensor([[1.0, 1.0, 6.0, 5.0]]), torch.tensor([0]), 4)
    out.sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert roi_align(features, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long), 4).shape == (0, 2, 4, 4)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_encoding_round_trip(weights):
    torch.manual_seed(2)
    anchors = torch.rand(50, 2) * 100
    anchors = torch.cat([anchors, anchors + 4 + torch.rand(50, 2) * 40], 1)
    boxes = torch.rand(50, 2) * 100
    boxes = torch.cat([boxes, boxes + 2 + torch.rand(50, 2) * 60], 1)
    coder = BoxCoder(weights)
    deltas = coder.encode(boxes, anchors)
    torch.testing.assert_close(coder.decode(deltas, anchors), boxes, atol=1e-3, rtol=1e-5)
    assert torch.allclose(coder.encode(anchors, anchors), torch.zeros(50, 4), atol=1e-6)
    huge = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), anchors[:1])  # scale clamped, finite
    assert torch.isfinite(huge).all()
    assert (huge[0, 2] - huge[0, 0]) == pytest.approx(float(anchors[0, 2] - anchors[0, 0]) * 1000 / 16, rel=1e-4)


def test_iou_nms_clip_and_mask_boxes():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0]])
    iou = box_iou(a, a)
    assert iou[0, 1].item() == pytest.approx(25 / 175) and iou[0, 2] == 0 and torch.allclose(iou.diag(), torch.ones(3))
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 9.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]  # 0 and 1 overlap the best (3) by > 0.5
    assert nms(boxes, scores, 0.95).tolist() == [3, 0, 1, 2]
    assert clip_boxes(torch.tensor([[-2.0, 3.0, 40.0, 50.0]]), 32, 30).tolist() == [[0.0, 3.0, 30.0, 32.0]]
    masks = torch.zeros(2, 8, 9, dtype=torch.bool)
    masks[0, 2:5, 3:7] = True
    assert masks_to_boxes(masks).tolist() == [[3.0, 2.0, 7.0, 5.0], [0.0, 0.0, 0.0, 0.0]]


def test_anchor_sizes_follow_the_lesions_and_anchors_tile_the_grid():
    sizes = anchor_sizes([6.0] * 10 + [12.0] * 80 + [48.0] * 10, levels=4)
    assert sizes[0] == pytest.approx(6.0) and sizes[-1] == pytest.approx(48.0)
    assert all(b / a == pytest.approx((48 / 6) ** (1 / 3)) for a, b in zip(sizes, sizes[1:], strict=False))
    assert anchor_sizes([1.0, 1.5], levels=3)[0] == 4.0  # at least MIN_ANCHOR, a factor 2 apart
    assert anchor_sizes([], levels=2) == [8.0, 64.0]
    cells = cell_anchors(16.0)
    areas = (cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])
    assert torch.allclose(areas, torch.full((3,), 256.0))
    anchors = grid_anchors(3, 4, stride=8, cells=cells)
    assert anchors.shape == (3 * 4 * 3, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert centres[0].tolist() == [4.0, 4.0] and centres[3 * 1].tolist() == [12.0, 4.0]  # next column
    assert centres[3 * 4].tolist() == [4.0, 12.0] and math.isclose(float(centres[-1, 0]), 28.0)
