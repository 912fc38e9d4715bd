"""Instance models at inference: pixels claimed per slice, slices linked into 3-D lesions with
learned scores, instances restricted to the post-processed mask (medseg.inference.instances)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medseg.config import InferenceConfig
from medseg.geometry import consecutive_labels, label_components
from medseg.inference.instances import claim_pixels, instances_in_mask, link_slices, predict_instances


def test_claim_pixels_takes_the_best_weighted_instance():
    masks = np.zeros((2, 4, 6), dtype=np.float32)
    masks[0, :, :4] = 0.9
    masks[1, :, 2:] = 0.8
    prob, ids = claim_pixels(np.array([0.5, 1.0]), masks, threshold=0.5)
    # columns 0-1: only instance 0 (0.45 < 0.5: unclaimed); 2-3: instance 1 (0.8 > 0.45); 4-5: instance 1
    assert np.allclose(prob[:, :2], 0.45) and np.allclose(prob[:, 2:], 0.8)
    assert (ids[:, :2] == 0).all() and (ids[:, 2:] == 2).all()
    empty_prob, empty_ids = claim_pixels(np.zeros(0), np.zeros((0, 4, 6)), 0.5)
    assert empty_prob.shape == (4, 6) and not empty_ids.any()


def test_linking_keeps_touching_lesions_apart_and_follows_a_shrinking_one():
    previous = np.zeros((8, 8), dtype=np.int32)
    previous[1:5, 0:4] = 1  # left lesion
    previous[1:5, 4:8] = 2  # right lesion, touching it
    current = np.zeros((8, 8), dtype=np.int32)
    current[1:5, 1:4] = 2  # ids of one slice say nothing about the next one's
    current[2:4, 4:6] = 1  # the right lesion, shrinking
    assert link_slices(previous, current) == {2: 1, 1: 2}
    # one to one: a merged instance continues only one of the two lesions
    merged = np.zeros((8, 8), dtype=np.int32)
    merged[1:5, 0:8] = 1
    assert link_slices(previous, merged) == {1: 1}
    # too little overlap: a new lesion
    far = np.zeros((8, 8), dtype=np.int32)
    far[4:8, 3:5] = 1
    assert link_slices(previous, far) == {}


def test_instances_in_mask_fills_orphans_renumbers_and_keeps_scores():
    instances = np.zeros((6, 6, 2), dtype=np.int32)
    instances[0:2, 0:2] = 7
    instances[3:6, 3:6] = 3
    mask = (instances > 0).astype(np.uint8)
    mask[2, 2, 0] = 1  # a voxel hole filling added: joins the nearest instance
    mask[0:2, 0:2, 1] = 0  # a voxel post-processing removed: dropped
    score_mean = np.linspace(0.1, 0.7, 7)
    lesions, n, mean, best = instances_in_mask(mask, instances, score_mean, score_mean + 0.1)
    assert n == 2 and lesions.dtype == np.int32
    assert (lesions > 0).sum() == mask.sum()
    assert lesions[0, 0, 0] == 1 and lesions[4, 4, 0] == 2  # raster order of the first voxel
    assert mean.tolist() == pytest.approx([score_mean[6], score_mean[2]])
    assert best.tolist() == pytest.approx([score_mean[6] + 0.1, score_mean[2] + 0.1])
    none, n_none, _, _ = instances_in_mask(mask, np.zeros_like(instances), score_mean, score_mean)
    assert n_none == 0 and not none.any()


def test_consecutive_labels_orders_like_connected_components():
    ids = np.zeros((5, 5, 3), dtype=np.int64)
    ids[3:5, 0:2, 0] = 40
    ids[0:2, 3:5, 1] = 9
    labels, old = consecutive_labels(ids)
    components, n = label_components(ids > 0)
    assert n == 2 and np.array_equal(labels, components) and old.tolist() == [9, 40]


class TwoSquares(nn.Module):
    """A stand-in detector: on every slice two touching squares (left score 0.9, right 0.6)
    whose right edge walks one pixel per slice; slice 3 has none."""

    multiple = 1

    def detect(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in x:
            z = int(image[0, 0, 0])  # the slice index, written into pixel (0, 0) by the test
            masks = torch.zeros((2, *image.shape[-2:]))
            if z != 3:
                masks[0, 2:6, 1:4] = 1.0
                masks[1, 2:6, 4:6 + z % 2] = 0.95
            keep = torch.tensor([0.9, 0.6]) if z != 3 else torch.zeros(0)
            out.append({"boxes": torch.zeros((keep.numel(), 4)), "scores": keep, "masks": masks[: keep.numel()]})
        return out


def test_predict_instances_links_slices_into_lesions_with_learned_scores():
    volume = torch.zeros((1, 8, 8, 6))  # (C, R, A, S), axial slices along S
    volume[0, 0, 0, :] = torch.arange(6, dtype=torch.float32)
    cfg = InferenceConfig(threshold=0.5, batch_size=4)
    found = predict_instances(TwoSquares(), volume, 0, cfg, "cpu", axis=-1)
    assert found.prob.shape == (8, 8, 6) and found.instances.shape == (8, 8, 6)
    # slices 0-2 and 4-5 are separated by the empty slice 3: two lesions each side
    assert found.instances.max() == 4
    left, right = found.instances[3, 2, 0], found.instances[3, 5, 0]
    assert left != right and left > 0 and right > 0
    assert set(np.unique(found.instances[:, :, :3])) == {0, left, right}
    assert found.score_mean[left - 1] == pytest.approx(0.9) and found.score_mean[right - 1] == pytest.approx(0.6)
    assert torch.allclose(found.prob[3, 2, 0], torch.tensor(0.9)) and float(found.prob[..., 3].max()) == 0.0
    # both touching lesions are one connected component: instances tell them apart
    assert label_components((found.instances[..., :3] > 0).astype(np.uint8))[1] == 1


def test_drop_low_scores_keeps_order_and_renumbers():
    from medseg.inference.instances import drop_low_scores

    lesions = np.array([[[1, 2, 3, 0]]], dtype=np.int32)
    out, n, mean, best = drop_low_scores(lesions, np.array([0.9, 0.3, 0.8]), np.array([0.95, 0.4, 0.85]), 0.5)
    assert n == 2 and out.tolist() == [[[1, 0, 2, 0]]]
    assert mean.tolist() == [0.9, 0.8] and best.tolist() == [0.95, 0.85]


def test_min_lesion_score_is_for_instance_models():
    from infer_helpers import identity_bundle

    from medseg.errors import MedsegError
    from medseg.inference.runner import CasePredictor

    with pytest.raises(MedsegError, match="min_lesion_score filters the learned lesion scores"):
        CasePredictor(identity_bundle(inference=InferenceConfig(min_lesion_score=0.5)))
