"""Mask R-CNN model (not yet in the registry): every loss term trains its head, inference returns
instances with learned scores, masks are pasted into their boxes on the image grid."""

from __future__ import annotations

import numpy as np
import torch

from medseg.models.detection.boxes import masks_to_boxes
from medseg.models.detection.maskrcnn import MaskRCNN, anchor_settings_for, paste_masks
from medseg.models.registry import ENCODERS


def touching_squares(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 64, 64) image and (2, 64, 64) instances: two squares sharing an edge."""
    image = torch.randn(1, 64, 64) * 0.1
    s1, s2 = int(rng.integers(8, 14)), int(rng.integers(8, 14))
    y, x = int(rng.integers(8, 40)), int(rng.integers(4, 30))
    a = torch.zeros(64, 64, dtype=torch.bool)
    a[y:y + s1, x:x + s1] = True
    b = torch.zeros(64, 64, dtype=torch.bool)
    b[y + 2:y + 2 + s2, x + s1:x + s1 + s2] = True
    image[0][a] += 1.0
    image[0][b] += 0.6
    return image, torch.stack([a, b])


def small_model() -> MaskRCNN:
    torch.manual_seed(0)
    return MaskRCNN(ENCODERS["resnet18"](in_channels=1, width=0.125), anchor_settings_for([8, 10, 12, 16, 20]))


def test_every_loss_term_reaches_its_head():
    model = small_model().train()
    rng = np.random.default_rng(0)
    batch = [touching_squares(rng) for _ in range(2)]
    losses = model.loss(torch.stack([b[0] for b in batch]), [b[1] for b in batch])
    assert set(losses) == {"rpn_objectness", "rpn_box", "box_class", "box_regression", "mask"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    for head in (model.rpn_objectness, model.rpn_deltas, model.box_score, model.box_deltas, model.mask_head[-1]):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    # an image without lesions trains the objectness and the box classifier on negatives only
    empty = model.loss(torch.randn(1, 1, 64, 64), [torch.zeros((0, 64, 64), dtype=torch.bool)])
    assert empty["mask"] == 0 and empty["rpn_box"] == 0 and empty["rpn_objectness"] > 0


def test_inference_returns_instances_and_a_probability_map():
    model = small_model().eval()
    model.settings.score_threshold = 0.0  # an untrained model: keep whatever it finds
    found = model.detect(torch.randn(2, 1, 60, 52))
    assert len(found) == 2
    for result in found:
        n = result["scores"].numel()
        assert result["boxes"].shape == (n, 4) and result["masks"].shape == (n, 60, 52)
        assert n <= model.settings.detections and (result["scores"] >= 0).all() and (result["scores"] <= 1).all()
    logits = model(torch.randn(2, 1, 60, 52))
    assert logits.shape == (2, 1, 60, 52) and torch.isfinite(logits).all()


def test_paste_masks_fill_their_boxes():
    boxes = torch.tensor([[4.0, 6.0, 12.0, 10.0], [0.0, 0.0, 3.0, 3.0]])
    pasted = paste_masks(torch.ones(2, 28, 28), boxes, 16, 20)
    inside = torch.zeros(16, 20, dtype=torch.bool)
    inside[6:10, 4:12] = True
    assert torch.equal(pasted[0] >= 0.5, inside)
    assert masks_to_boxes(pasted >= 0.5).tolist() == boxes.tolist()
    half = torch.zeros(1, 28, 28)
    half[0, :, :14] = 1.0  # left half of the box
    assert torch.equal((paste_masks(half, boxes[:1], 16, 20)[0] >= 0.5).nonzero()[:, 1].unique(), torch.arange(4, 8))
