"""postprocess and the lesion table: thresholds, small-lesion removal in mm3, holes, components, measures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_affine

from medseg.config import InferenceConfig
from medseg.geometry import index_axis, inplane_diameter_mm, max_inplane_diameter_mm
from medseg.geometry import label_components as label_lesions
from medseg.inference import postprocess
from medseg.inference.lesion_table import LESION_COLUMNS, lesion_table
from medseg.inference.postprocess import remove_small_lesions


def test_threshold_is_inclusive_and_tensor_or_array():
    prob = np.array([0.2, 0.5, 0.7], np.float32).reshape(1, 1, 3)
    cfg = InferenceConfig(min_lesion_mm3=0)
    np.testing.assert_array_equal(postprocess(prob, (1, 1, 1), cfg)[0, 0], [0, 1, 1])
    out = postprocess(torch.from_numpy(prob), (1, 1, 1), cfg.model_copy(update={"threshold": 0.6}))
    assert out.dtype == np.uint8 and out.tolist() == [[[0, 0, 1]]]


def test_small_lesions_removed_by_volume_in_mm3():
    prob = np.zeros((10, 10, 10), np.float32)
    prob[1:3, 1:3, 1] = 1  # 4 voxels
    prob[6:9, 6:9, 6:9] = 1  # 27 voxels
    spacing = (1.0, 1.0, 2.5)  # 4 voxels = 10 mm3
    kept = postprocess(prob, spacing, InferenceConfig(min_lesion_mm3=10.0))
    assert int(kept.sum()) == 31
    removed = postprocess(prob, spacing, InferenceConfig(min_lesion_mm3=10.5))
    assert int(removed.sum()) == 27 and removed[1, 1, 1] == 0


def test_connectivity_decides_what_one_lesion_is():
    prob = np.zeros((6, 6, 6), np.float32)
    prob[1, 1, 1] = prob[2, 2, 2] = 1  # touch by a corner only
    cfg = InferenceConfig(min_lesion_mm3=1.5)
    assert int(postprocess(prob, (1, 1, 1), cfg).sum()) == 2  # 26-connected: one 2-voxel lesion
    assert int(postprocess(prob, (1, 1, 1), cfg.model_copy(update={"connectivity": 6})).sum()) == 0


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_small_lesion_removal_matches_a_whole_volume_reference(rng, connectivity):
    """Against cc3d.dust on the whole volume: same voxels kept, multi-class values untouched."""
    import cc3d

    mask = ((rng.random((40, 36, 30)) > 0.93) * rng.integers(1, 4, (40, 36, 30))).astype(np.uint8)
    mask[:5] = 0  # an empty margin, so the bounding-box path is exercised
    mask[10:16, 10:16, 10:16] = 2  # one large lesion
    for min_voxels in (2, 3, 7, 300):
        kept = remove_small_lesions(mask.copy(), (1.0, 1.0, 1.0), float(min_voxels), connectivity)
        reference = np.where(cc3d.dust(mask > 0, threshold=min_voxels, connectivity=connectivity), mask, 0)
        np.testing.assert_array_equal(kept, reference)


def test_fill_holes_and_largest_component():
    prob = np.zeros((12, 12, 12), np.float32)
    prob[1:6, 1:6, 1:6] = 1
    prob[3, 3, 3] = 0  # a hole
    prob[9:11, 9:11, 9:11] = 1  # a second, smaller lesion
    plain = postprocess(prob, (1, 1, 1), InferenceConfig(min_lesion_mm3=0))
    assert plain[3, 3, 3] == 0 and plain[9, 9, 9] == 1
    filled = postprocess(prob, (1, 1, 1), InferenceConfig(min_lesion_mm3=0, fill_holes=True, largest_component=True))
    assert filled.dtype == np.uint8
    assert filled[3, 3, 3] == 1 and filled[9, 9, 9] == 0 and int(filled.sum()) == 125


def test_multiclass_argmax():
    prob = np.zeros((3, 4, 4, 4), np.float32)
    prob[0] = 0.6
    prob[2, :2] = 0.9
    prob[1, 3] = 0.7
    mask = postprocess(prob, (1, 1, 1), InferenceConfig(min_lesion_mm3=0))
    assert set(np.unique(mask[:2])) == {2} and set(np.unique(mask[3])) == {1} and set(np.unique(mask[2])) == {0}


def test_inplane_diameter_is_corner_to_corner():
    pixels = np.argwhere(np.ones((3, 4), bool))
    np.testing.assert_allclose(inplane_diameter_mm(pixels, (0.5, 2.0)), np.hypot(1.5, 8.0))
    np.testing.assert_allclose(inplane_diameter_mm(np.array([[0, 0]]), (1.0, 1.0)), np.sqrt(2))
    line = np.array([[0, i] for i in range(20)])  # collinear centres
    np.testing.assert_allclose(inplane_diameter_mm(line, (1.0, 1.0)), np.hypot(1.0, 20.0))


@pytest.mark.parametrize("kind", ["ras", "lps", "oblique"])
def test_lesion_table_measures(kind):
    affine = make_affine(kind, spacing=(0.5, 2.0, 3.0))
    mask = np.zeros((20, 12, 8), np.uint8)
    mask[2:5, 3:7, 1:3] = 1  # lesion 1: 3 x 4 pixels on 2 slices
    mask[10:12, 8:10, 5] = 1  # lesion 2
    prob = np.where(mask > 0, 0.8, 0.1).astype(np.float32)
    prob[2, 3, 1] = 0.95
    labels, n = label_lesions(mask)
    axis = index_axis(affine, 2)
    assert n == 2 and labels.dtype == np.uint16 and axis == 2
    table = lesion_table(labels, n, prob, affine, (0.5, 2.0, 3.0), axis)
    assert list(table.columns) == list(LESION_COLUMNS)
    first = table.iloc[0]
    assert first.lesion_id == 1 and first.voxels == 24 and first["class"] == 1
    np.testing.assert_allclose(first.volume_ml, 24 * 3.0 / 1000)
    np.testing.assert_allclose([first.score_mean, first.score_max], [(23 * 0.8 + 0.95) / 24, 0.95], rtol=1e-6)
    centre = np.array([3.0, 4.5, 1.5])
    np.testing.assert_allclose([first.centroid_i, first.centroid_j, first.centroid_k], centre)
    np.testing.assert_allclose([first.centroid_x_ras_mm, first.centroid_y_ras_mm, first.centroid_z_ras_mm],
                               (affine @ [*centre, 1])[:3], atol=1e-6)
    assert [first.bbox_i_min, first.bbox_i_max, first.bbox_j_min, first.bbox_j_max, first.bbox_k_min, first.bbox_k_max] == [2, 4, 3, 6, 1, 2]
    np.testing.assert_allclose(first.max_inplane_diameter_mm, np.hypot(1.5, 8.0))
    empty = lesion_table(*label_lesions(np.zeros_like(mask)), prob, affine, (0.5, 2.0, 3.0), axis)
    assert list(empty.columns) == list(LESION_COLUMNS) and len(empty) == 0


def test_slice_axis_follows_the_orientation():
    permuted = np.array([[0, 0, 2.0, 0], [1.0, 0, 0, 0], [0, -3.0, 0, 0], [0, 0, 0, 1]])  # i->A, j->S(-), k->R
    assert index_axis(permuted, 2) == 1  # axial slices are normal to j
    assert index_axis(permuted, 0) == 2 and index_axis(permuted, 1) == 0


def test_bounding_box_labelling_matches_the_whole_volume(rng):
    import cc3d

    mask = (rng.random((30, 25, 20)) > 0.93).astype(np.uint8)
    mask[:5] = 0
    mask[:, -4:] = 0
    labels, n = label_lesions(mask, connectivity=6)
    full, n_full = cc3d.connected_components(mask > 0, connectivity=6, return_N=True)
    assert n == n_full > 10
    np.testing.assert_array_equal(labels, full)


@pytest.mark.parametrize("shape", ["random", "ellipsoid"])
@pytest.mark.parametrize("axis", [0, 2])
def test_inplane_diameter_equals_brute_force(rng, axis, shape):
    """Also for slices of very different sizes (an ellipsoid with holes), where the largest-box-
    first search skips most slices."""
    from scipy.spatial.distance import pdist


    if shape == "random":
        component = rng.random((9, 8, 7)) > 0.6
    else:
        i, j, k = np.ogrid[:21, :17, :15]
        component = ((i - 10) / 10) ** 2 + ((j - 8) / 6) ** 2 + ((k - 7) / 7) ** 2 < 1
        component &= rng.random(component.shape) > 0.2
    spacing = (0.7, 1.3, 2.0)
    plane = [spacing[a] for a in range(3) if a != axis]
    corners = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    expected = max(
        pdist(((np.argwhere(sl)[:, None, :] + corners[None]) * plane).reshape(-1, 2)).max()
        for sl in np.moveaxis(component, axis, 0) if sl.sum() > 0
    )
    np.testing.assert_allclose(max_inplane_diameter_mm(component, axis, spacing), expected)


def test_min_component_fraction_keeps_lesions_relative_to_the_largest():
    prob = np.zeros((20, 20, 20), np.float32)
    prob[1:6, 1:6, 1:6] = 0.9  # 125 voxels: the largest
    prob[10:13, 10:13, 10:13] = 0.9  # 27 voxels: 0.216 of the largest
    prob[16:18, 16:18, 16:18] = 0.9  # 8 voxels: 0.064
    cfg = InferenceConfig(min_lesion_mm3=0)
    sizes = lambda mask: sorted(np.bincount(label_lesions(mask, 26)[0].ravel())[1:].tolist())  # noqa: E731
    assert sizes(postprocess(prob, (1, 1, 1), cfg)) == [8, 27, 125]
    assert sizes(postprocess(prob, (1, 1, 1), cfg.model_copy(update={"min_component_fraction": 0.1}))) == [27, 125]
    assert sizes(postprocess(prob, (1, 1, 1), cfg.model_copy(update={"min_component_fraction": 0.216}))) == [27, 125]
    assert sizes(postprocess(prob, (1, 1, 1), cfg.model_copy(update={"min_component_fraction": 0.25}))) == [125]
    assert sizes(postprocess(prob, (1, 1, 1), cfg.model_copy(update={"min_component_fraction": 1.0}))) == [125]
    # the fraction is of the largest lesion left after the size filter
    after = cfg.model_copy(update={"min_lesion_mm3": 200.0, "min_component_fraction": 0.5})
    assert sizes(postprocess(prob, (1, 1, 1), after)) == []
