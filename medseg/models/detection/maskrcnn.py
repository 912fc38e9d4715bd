"""Mask R-CNN (He et al. 2017) for 2-D (or 2.5D) lesion instances, on a medseg encoder + FPN.

Pipeline for a batch ``x`` (B, C, H, W) (edge-padded to the deepest used stride):

1. **Backbone + FPN**: the encoder's features at strides >= 4 (at most four levels), lateral 1x1
   convs, top-down nearest upsampling and sum, 3x3 output convs -> ``fpn_channels`` maps.
2. **RPN**: a shared 3x3 conv, then per anchor an objectness logit and box deltas
   (:class:`.boxes.BoxCoder` (1, 1, 1, 1)). One anchor size per level from the training lesions
   (:func:`.anchors.anchor_sizes`), aspect ratios 0.5, 1, 2. Training: anchors with IoU >= 0.7
   to a lesion box (and each lesion's best anchors) are positive, < 0.3 negative; 256 sampled
   per image, half positive at most; BCE + smooth L1. Proposals: top-k per level, decoded,
   clipped, NMS 0.7.
3. **RoI heads**: proposals (plus the ground-truth boxes in training) matched at IoU 0.5,
   64 sampled per image with at most 25 % lesions. RoIAlign (:mod:`.roi_align`, 7 x 7 from the
   FPN level that fits the box size) -> two FC layers -> lesion-vs-background logits and box
   deltas (BoxCoder (10, 10, 5, 5)). The mask branch runs **in parallel** on the lesion RoIs:
   RoIAlign 14 x 14 -> four 3x3 convs -> 2x deconv -> 28 x 28 logits, trained with per-pixel BCE
   against the lesion's mask RoIAligned into the same box.
4. **Inference**: box scores (softmax), decoded and clipped boxes, score >= ``score_threshold``,
   NMS 0.5, at most ``detections`` per image; the mask branch on the kept boxes; each 28 x 28
   mask is resized into its box (bilinear) on the image grid. :meth:`MaskRCNN.detect` returns the
   instances (boxes, learned scores, mask probabilities); :meth:`MaskRCNN.forward` in eval mode
   returns medseg's usual (B, 1, H, W) logits of ``max_i score_i * mask_i`` so the sliding-window
   predictor, validation Dice and export work unchanged.

Targets: :meth:`MaskRCNN.loss` takes, per image, an (N_i, H, W) boolean stack of lesion
instances (touching lesions are separate instances when the reference labels them apart).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.blocks import pad_to_multiple
from medseg.models.detection.anchors import DEFAULT_RATIOS, anchor_sizes, cell_anchors, grid_anchors
from medseg.models.detection.boxes import BoxCoder, box_area, box_iou, clip_boxes, masks_to_boxes, nms
from medseg.models.detection.roi_align import roi_align
from medseg.models.encoders import Encoder


@dataclass
class MaskRCNNSettings:
    """Sizes and thresholds (module docstring); ``anchor_sizes`` one per FPN level, smallest first."""

    anchor_sizes: list[float] = field(default_factory=lambda: anchor_sizes([], 4))
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    fpn_channels: int = 64
    rpn_pre_nms: tuple[int, int] = (1000, 500)  # per level, (train, eval)
    rpn_post_nms: tuple[int, int] = (200, 100)
    rpn_nms: float = 0.7
    rpn_iou: tuple[float, float] = (0.3, 0.7)  # negative below, positive from
    rpn_batch: int = 256
    roi_batch: int = 64  # per image: lesion slices hold few objects; the mask head runs on up to a quarter of these
    roi_positive_fraction: float = 0.25
    roi_iou: float = 0.5
    score_threshold: float = 0.05
    box_nms: float = 0.5
    detections: int = 50
    roi_size: int = 7
    mask_size: int = 28
    hidden: int = 256


class FPN(nn.Module):
    """Feature pyramid: ``[(B, c_i, H_i, W_i)]`` shallow first -> ``[(B, channels, H_i, W_i)]``."""

    def __init__(self, in_channels: list[int], channels: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        top = self.lateral[-1](features[-1])
        outs = [self.output[-1](top)]
        for i in range(len(features) - 2, -1, -1):
            top = self.lateral[i](features[i]) + F.interpolate(top, size=features[i].shape[-2:], mode="nearest")
            outs.insert(0, self.output[i](top))
        return outs


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")


def sample_labels(labels: torch.Tensor, batch: int, positive_fraction: float, generator: torch.Generator | None = None):
    """Indices of sampled positives (label 1) and negatives (label 0); -1 is ignored."""
    positive = torch.nonzero(labels == 1, as_tuple=True)[0]
    negative = torch.nonzero(labels == 0, as_tuple=True)[0]
    n_pos = min(positive.numel(), int(batch * positive_fraction))
    n_neg = min(negative.numel(), batch - n_pos)
    positive = positive[torch.randperm(positive.numel(), generator=generator)[:n_pos]]
    negative = negative[torch.randperm(negative.numel(), generator=generator)[:n_neg]]
    return positive, negative


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, M, M) mask probabilities in their boxes -> (N, height, width) on the image (bilinear;
    0 outside the box). Image pixel (r, c) has its centre at (c + 0.5, r + 0.5)."""
    n = masks.shape[0]
    if n == 0:
        return masks.new_zeros((0, height, width))
    xs = torch.arange(width, dtype=masks.dtype, device=masks.device) + 0.5
    ys = torch.arange(height, dtype=masks.dtype, device=masks.device) + 0.5
    w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-3)
    h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-3)
    gx = 2 * (xs[None] - boxes[:, 0:1]) / w[:, None] - 1  # (N, W)
    gy = 2 * (ys[None] - boxes[:, 1:2]) / h[:, None] - 1  # (N, H)
    grid = torch.stack([gx[:, None, :].expand(n, height, width), gy[:, :, None].expand(n, height, width)], dim=-1)
    return F.grid_sample(masks[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


class MaskRCNN(nn.Module):
    """Encoder + FPN + RPN + box and mask heads (module docstring) for one lesion class."""

    def __init__(self, encoder: Encoder, settings: MaskRCNNSettings | None = None) -> None:
        super().__init__()
        s = replace(settings) if settings is not None else MaskRCNNSettings()  # a copy: the caller's stays as given
        self.encoder = encoder
        self.level_ids = [i for i, stride in enumerate(encoder.strides) if stride >= 4][:4]
        if len(self.level_ids) < 2:
            raise ValueError("maskrcnn needs an encoder with at least two feature levels at stride >= 4")
        self.strides = [encoder.strides[i] for i in self.level_ids]
        sizes = list(s.anchor_sizes)[: len(self.strides)]
        while len(sizes) < len(self.strides):  # one size per level: double the largest for levels beyond the list
            sizes.append(sizes[-1] * 2)
        s.anchor_sizes = sizes
        self.settings = s
        self.multiple = max(self.strides)
        c = s.fpn_channels
        self.fpn = FPN([encoder.out_channels[i] for i in self.level_ids], c)
        n_anchors = len(s.ratios)
        self.rpn_conv = nn.Conv2d(c, c, 3, padding=1)
        self.rpn_objectness = nn.Conv2d(c, n_anchors, 1)
        self.rpn_deltas = nn.Conv2d(c, 4 * n_anchors, 1)
        self.box_head = nn.Sequential(nn.Flatten(), nn.Linear(c * s.roi_size**2, s.hidden), nn.ReLU(),
                                      nn.Linear(s.hidden, s.hidden), nn.ReLU())  # fmt: skip
        self.box_score = nn.Linear(s.hidden, 2)
        self.box_deltas = nn.Linear(s.hidden, 4)
        layers: list[nn.Module] = []
        for _ in range(4):
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
        self.mask_head = nn.Sequential(*layers, nn.ConvTranspose2d(c, c, 2, stride=2), nn.ReLU(), nn.Conv2d(c, 1, 1))
        self.rpn_coder, self.box_coder = BoxCoder(), BoxCoder((10.0, 10.0, 5.0, 5.0))
        for name, cells in enumerate(cell_anchors(size, s.ratios) for size in s.anchor_sizes):
            self.register_buffer(f"cells_{name}", cells, persistent=False)

    # ------------------------------------------------------------------ shared parts

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.encoder(x)
        return self.fpn([features[i] for i in self.level_ids])

    def rpn(self, pyramid: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Objectness (B, N), deltas (B, N, 4), anchors (N, 4) and their level (N,) over all levels."""
        scores, deltas, anchors, levels = [], [], [], []
        for level, feature in enumerate(pyramid):
            b, _, h, w = feature.shape
            t = F.relu(self.rpn_conv(feature))
            # float32 from here on (under autocast too): box coordinates in bf16 are off by pixels
            scores.append(self.rpn_objectness(t).float().permute(0, 2, 3, 1).reshape(b, -1))
            d = self.rpn_deltas(t).float().view(b, -1, 4, h, w).permute(0, 3, 4, 1, 2)
            deltas.append(d.reshape(b, -1, 4))
            cells = getattr(self, f"cells_{level}")
            anchors.append(grid_anchors(h, w, self.strides[level], cells).to(feature.device))
            levels.append(torch.full((anchors[-1].shape[0],), level, dtype=torch.long, device=feature.device))
        return torch.cat(scores, 1), torch.cat(deltas, 1), torch.cat(anchors), torch.cat(levels)

    def proposals(self, scores, deltas, anchors, levels, size: tuple[int, int]) -> list[torch.Tensor]:
        """Per image: (P, 4) proposal boxes (top-k per level, decoded, clipped, NMS)."""
        s, mode = self.settings, 0 if self.training else 1
        out = []
        for b in range(scores.shape[0]):
            keep_boxes, keep_scores = [], []
            for level in range(len(self.strides)):
                idx = torch.nonzero(levels == level, as_tuple=True)[0]
                top = scores[b, idx].detach().topk(min(s.rpn_pre_nms[mode], idx.numel())).indices
                chosen = idx[top]
                boxes = clip_boxes(self.rpn_coder.decode(deltas[b, chosen].detach(), anchors[chosen]), *size)
                ok = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
                keep_boxes.append(boxes[ok])
                keep_scores.append(scores[b, chosen].detach()[ok])
            boxes, box_scores = torch.cat(keep_boxes), torch.cat(keep_scores)
            kept = nms(boxes, box_scores, s.rpn_nms, s.rpn_post_nms[mode])
            out.append(boxes[kept])
        return out

    def roi_features(self, pyramid: list[torch.Tensor], boxes: torch.Tensor, batch_index: torch.Tensor, size: int) -> torch.Tensor:
        """RoIAlign of ``boxes`` from the FPN level that fits each box: level k holds boxes whose
        side is nearest its anchor size (log scale)."""
        side = box_area(boxes).clamp(min=1e-6).sqrt()
        sizes = torch.as_tensor(self.settings.anchor_sizes, dtype=side.dtype, device=side.device)
        level = torch.argmin((side[:, None].log() - sizes[None].log()).abs(), dim=1)
        out = pyramid[0].new_zeros((boxes.shape[0], pyramid[0].shape[1], size, size))
        for k, feature in enumerate(pyramid):
            sel = torch.nonzero(level == k, as_tuple=True)[0]
            if sel.numel():
                out[sel] = roi_align(feature, boxes[sel], batch_index[sel], size, 1.0 / self.strides[k], 2).to(out.dtype)
        return out

    # ------------------------------------------------------------------ training

    def loss(self, x: torch.Tensor, instances: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training losses for ``x`` (B, C, H, W) and per image an (N_i, H, W) boolean instance
        stack: ``rpn_objectness``, ``rpn_box``, ``box_class``, ``box_regression``, ``mask``."""
        s = self.settings
        size = (x.shape[-2], x.shape[-1])
        x = pad_to_multiple(x, self.multiple)
        pyramid = self.pyramid(x)
        scores, deltas, anchors, levels = self.rpn(pyramid)
        dev = x.device
        gt_boxes = [masks_to_boxes(m) if m.shape[0] else torch.zeros((0, 4), device=dev) for m in instances]
        losses = {k: x.new_zeros(()) for k in ("rpn_objectness", "rpn_box", "box_class", "box_regression", "mask")}
        n_rpn = 0
        for b, boxes in enumerate(gt_boxes):
            labels = torch.zeros(anchors.shape[0], dtype=torch.long, device=dev)
            matched = torch.zeros(anchors.shape[0], dtype=torch.long, device=dev)
            if boxes.shape[0]:
                iou = box_iou(anchors, boxes)
                best, matched = iou.max(dim=1)
                labels = torch.where(best >= s.rpn_iou[1], 1, torch.where(best < s.rpn_iou[0], 0, -1))
                best_per_gt = iou.max(dim=0).values
                labels[((iou == best_per_gt[None]) & (best_per_gt[None] > 0)).any(dim=1)] = 1
            pos, neg = sample_labels(labels, s.rpn_batch, 0.5)
            sampled = torch.cat([pos, neg])
            n_rpn += sampled.numel()
            target = torch.cat([torch.ones(pos.numel(), device=dev), torch.zeros(neg.numel(), device=dev)])
            losses["rpn_objectness"] = losses["rpn_objectness"] + F.binary_cross_entropy_with_logits(
                scores[b, sampled], target, reduction="sum")
            if pos.numel():
                goal = self.rpn_coder.encode(boxes[matched[pos]], anchors[pos])
                losses["rpn_box"] = losses["rpn_box"] + smooth_l1(deltas[b, pos], goal, 1.0 / 9)
        losses["rpn_objectness"] = losses["rpn_objectness"] / max(n_rpn, 1)
        losses["rpn_box"] = losses["rpn_box"] / max(n_rpn, 1)

        proposals = self.proposals(scores, deltas, anchors, levels, size)
        roi_boxes, roi_batch, roi_labels, roi_targets, roi_masks = [], [], [], [], []
        for b, (props, boxes) in enumerate(zip(proposals, gt_boxes, strict=True)):
            candidates = torch.cat([props, boxes])
            labels = torch.zeros(candidates.shape[0], dtype=torch.long, device=dev)
            matched = torch.zeros(candidates.shape[0], dtype=torch.long, device=dev)
            if boxes.shape[0]:
                best, matched = box_iou(candidates, boxes).max(dim=1)
                labels = (best >= s.roi_iou).long()
            pos, neg = sample_labels(labels, s.roi_batch, s.roi_positive_fraction)
            for idx, label in ((pos, 1), (neg, 0)):
                roi_boxes.append(candidates[idx])
                roi_batch.append(torch.full((idx.numel(),), b, dtype=torch.long, device=dev))
                roi_labels.append(torch.full((idx.numel(),), label, dtype=torch.long, device=dev))
                roi_targets.append(boxes[matched[idx]] if label else torch.zeros((idx.numel(), 4), device=dev))
                if label and idx.numel():
                    # the lesion's mask RoIAligned into the sampled box, as the mask branch's target
                    own = roi_align(instances[b].float()[None], candidates[idx], torch.zeros(idx.numel(), dtype=torch.long, device=dev),
                                    s.mask_size, 1.0, 2)  # (n, N_b, M, M)  # fmt: skip
                    roi_masks.append(own[torch.arange(idx.numel()), matched[idx]] >= 0.5)
        boxes = torch.cat(roi_boxes)
        batch_index, labels, targets = torch.cat(roi_batch), torch.cat(roi_labels), torch.cat(roi_targets)
        if boxes.shape[0]:
            hidden = self.box_head(self.roi_features(pyramid, boxes, batch_index, s.roi_size))
            losses["box_class"] = F.cross_entropy(self.box_score(hidden).float(), labels)
            fg = torch.nonzero(labels == 1, as_tuple=True)[0]
            if fg.numel():
                goal = self.box_coder.encode(targets[fg], boxes[fg])
                losses["box_regression"] = smooth_l1(self.box_deltas(hidden)[fg].float(), goal, 1.0) / labels.numel()
                mask_logits = self.mask_head(self.roi_features(pyramid, boxes[fg], batch_index[fg], s.mask_size // 2))
                losses["mask"] = F.binary_cross_entropy_with_logits(mask_logits[:, 0].float(), torch.cat(roi_masks).float())
        return losses

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def detect(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per image: ``boxes`` (N, 4), ``scores`` (N,) learned lesion scores, ``masks`` (N, H, W)
        mask probabilities on the image grid (module docstring, step 4)."""
        s = self.settings
        h, w = x.shape[-2], x.shape[-1]
        pyramid = self.pyramid(pad_to_multiple(x, self.multiple))
        scores, deltas, anchors, levels = self.rpn(pyramid)
        proposals = self.proposals(scores, deltas, anchors, levels, (h, w))
        results = []
        for b, props in enumerate(proposals):
            batch_index = torch.full((props.shape[0],), b, dtype=torch.long, device=x.device)
            if props.shape[0] == 0:
                results.append({"boxes": props, "scores": props.new_zeros(0), "masks": x.new_zeros((0, h, w))})
                continue
            hidden = self.box_head(self.roi_features(pyramid, props, batch_index, s.roi_size))
            score = F.softmax(self.box_score(hidden).float(), dim=1)[:, 1]
            boxes = clip_boxes(self.box_coder.decode(self.box_deltas(hidden).float(), props), h, w)
            ok = (score >= s.score_threshold) & ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
            boxes, score = boxes[ok], score[ok]
            kept = nms(boxes, score, s.box_nms, s.detections)
            boxes, score = boxes[kept], score[kept]
            masks = x.new_zeros((0, h, w))
            if boxes.shape[0]:
                kept_index = torch.full((boxes.shape[0],), b, dtype=torch.long, device=x.device)
                logits = self.mask_head(self.roi_features(pyramid, boxes, kept_index, s.mask_size // 2))
                masks = paste_masks(torch.sigmoid(logits[:, 0].float()), boxes, h, w)
            results.append({"boxes": boxes, "scores": score, "masks": masks})
        return results

    def forward(self, x: torch.Tensor, instances: list[torch.Tensor] | None = None):
        """With ``instances`` (training): :meth:`loss`, a dict of loss terms, so DDP sees the
        training pass as the wrapper's forward. Without: (B, C, H, W) -> (B, 1, H, W) logits of
        the per-pixel ``max_i score_i * mask_i`` (no gradient: the dense view for validation,
        the sliding-window predictor and export)."""
        if instances is not None:
            return self.loss(x, instances)
        prob = x.new_zeros((x.shape[0], 1, x.shape[-2], x.shape[-1]), dtype=torch.float32)
        for b, found in enumerate(self.detect(x)):
            if found["scores"].numel():
                prob[b, 0] = (found["scores"][:, None, None] * found["masks"]).float().max(dim=0).values
        eps = 1e-4
        return torch.logit(prob.clamp(eps, 1 - eps))


def anchor_settings_for(diameters_px: list[float], levels: int = 4) -> MaskRCNNSettings:
    """Settings with anchors sized from lesion diameters (pixels at training resolution)."""
    return MaskRCNNSettings(anchor_sizes=anchor_sizes(diameters_px, levels))


def instance_sides(label: np.ndarray) -> list[float]:
    """Square-equivalent box side ``sqrt(h * w)`` in pixels of every 2-D instance of a slice-major
    (S, H, W) map of per-slice instance ids (0 background): what the anchors are sized from."""
    from scipy import ndimage

    sides: list[float] = []
    for z in np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1)):
        for box in ndimage.find_objects(label[z]):
            if box is not None:
                sides.append(float(np.sqrt((box[0].stop - box[0].start) * (box[1].stop - box[1].start))))
    return sides


def build_maskrcnn(encoder: Encoder, out_channels: int = 1, anchor_sizes: list[float] | None = None) -> MaskRCNN:
    """Registry builder of ``maskrcnn``: one lesion class (``out_channels`` 1), anchors of
    ``anchor_sizes`` (pixels per FPN level; None: :func:`.anchors.anchor_sizes`' default)."""
    if out_channels != 1:
        raise ValueError(f"maskrcnn detects one lesion class: model.out_channels must be 1, got {out_channels}")
    settings = MaskRCNNSettings(anchor_sizes=[float(a) for a in anchor_sizes]) if anchor_sizes else None
    return MaskRCNN(encoder, settings)


def instance_targets(label: torch.Tensor) -> list[torch.Tensor]:
    """(B, 1, H, W) per-slice instance ids (0 background, float or int) -> per image an
    (N_i, H, W) boolean stack, one mask per distinct non-zero id (ascending)."""
    out = []
    for image in label[:, 0]:
        ids = torch.unique(image)
        ids = ids[ids > 0]
        out.append(image[None] == ids[:, None, None] if ids.numel() else torch.zeros((0, *image.shape), dtype=torch.bool,
                                                                                     device=image.device))
    return out


__all__ = ["FPN", "MaskRCNN", "MaskRCNNSettings", "anchor_settings_for", "build_maskrcnn", "instance_sides", "instance_targets",
           "paste_masks"]
