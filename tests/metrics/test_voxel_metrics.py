"""Voxel metrics: hand-computed cubes, the empty-mask policy, and a cross-check against MONAI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric
from scipy import ndimage

from medseg.metrics.voxel import global_dice, surface_distances, voxel_metrics

SPACING = (2.0, 1.0, 0.5)
# MONAI 1.6 warns about its own deprecated argument inside HausdorffDistanceMetric
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning")


def cube(shape: tuple[int, int, int], start: tuple[int, int, int], size: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


@pytest.mark.parametrize("axis", [0, 2])
def test_cubes_offset_by_one_voxel(axis: int) -> None:
    """Two 4x4x4 cubes, the prediction shifted by k = 1 voxel along ``axis``.

    Overlap 3x4x4 = 48 of 64 voxels each: Dice = 96/128 = 0.75, IoU = 48/80 = 0.6.
    Surface of a 4³ cube = 64 - 2³ = 56 voxels. Pred -> ref: the 16 voxels of the trailing
    face lie one step (spacing[axis]) from the reference's face; 4 voxels of the leading face
    are inside the reference's inner 2x2x2 core and lie one voxel from its nearest face, i.e.
    min(spacing) = 0.5 mm away; the other 36 lie on the reference surface (0). Same the other
    way round. HD95: sorted distances have the 16 largest at indices 40..55 and the 95th
    percentile sits at index 0.95*55 = 52.25, so HD95 = spacing[axis]. ASSD = (2*(16*s + 4*0.5)) / 112.
    """
    ref = cube((8, 8, 8), (2, 2, 2), 4)
    start = [2, 2, 2]
    start[axis] += 1
    pred = cube((8, 8, 8), tuple(start), 4)  # type: ignore[arg-type]
    s = SPACING[axis]
    m = voxel_metrics(pred, ref, SPACING)
    assert m.dice == pytest.approx(0.75)
    assert m.iou == pytest.approx(0.6)
    assert m.precision == pytest.approx(0.75) and m.recall == pytest.approx(0.75)
    assert m.hd95_mm == pytest.approx(s)
    assert m.assd_mm == pytest.approx(2 * (16 * s + 4 * 0.5) / 112)
    voxel_ml = 2.0 * 1.0 * 0.5 / 1000
    assert m.ref_volume_ml == pytest.approx(64 * voxel_ml) and m.pred_volume_ml == pytest.approx(
        64 * voxel_ml
    )
    assert m.abs_volume_diff_ml == 0.0 and m.rel_volume_diff == 0.0
    assert (m.tp_voxels, m.fp_voxels, m.fn_voxels, m.empty) == (48, 16, 16, "none")


def test_half_cube_prediction_volumes() -> None:
    """Prediction = half of the reference cube (4x4x2 of 4x4x4): Dice 2*32/96, precision 1, recall 0.5,
    relative volume difference (32 - 64) / 64 = -0.5."""
    ref = cube((6, 6, 6), (1, 1, 1), 4)
    pred = ref.copy()
    pred[:, :, 3:] = False
    m = voxel_metrics(pred, ref, SPACING)
    assert m.dice == pytest.approx(2 / 3)
    assert m.iou == pytest.approx(0.5)
    assert (m.precision, m.recall) == (1.0, 0.5)
    assert m.rel_volume_diff == pytest.approx(-0.5)
    assert m.abs_volume_diff_ml == pytest.approx(32 * 1e-3)


def test_empty_mask_policy() -> None:
    empty = np.zeros((5, 5, 5), dtype=bool)
    lesion = cube((5, 5, 5), (1, 1, 1), 2)
    both = voxel_metrics(empty, empty, SPACING)
    assert (both.dice, both.iou, both.precision, both.recall, both.hd95_mm, both.assd_mm) == (
        1,
        1,
        1,
        1,
        0,
        0,
    )
    assert both.empty == "both" and math.isnan(both.rel_volume_diff)

    no_ref = voxel_metrics(lesion, empty, SPACING)
    assert no_ref.empty == "reference"
    assert (no_ref.dice, no_ref.iou, no_ref.precision) == (0, 0, 0)
    assert math.isnan(no_ref.recall) and math.isnan(no_ref.hd95_mm) and math.isnan(no_ref.assd_mm)

    no_pred = voxel_metrics(empty, lesion, SPACING)
    assert no_pred.empty == "prediction"
    assert (no_pred.dice, no_pred.recall, no_pred.rel_volume_diff) == (0, 0, -1)
    assert math.isnan(no_pred.precision) and math.isnan(no_pred.hd95_mm)


def test_global_dice_pools_voxels() -> None:
    # case 1: tp 10, fp 0, fn 0 (Dice 1); case 2: tp 0, fp 90, fn 0 (Dice 0) -> 2*10 / (20 + 90)
    assert global_dice([10, 0], [0, 90], [0, 0]) == pytest.approx(20 / 110)
    assert global_dice([0], [0], [0]) == 1.0


def random_blobs(rng: np.random.Generator, shape: tuple[int, int, int], level: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0)
    return noise > level * noise.std()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_monai_dice_hd95_assd(seed: int) -> None:
    """Same surface definition as MONAI (erosion edges, no sub-voxels): equal to float32 precision."""
    rng = np.random.default_rng(seed)
    shape = (40, 36, 28)
    spacing = (0.8, 1.3, 2.5)
    ref = random_blobs(rng, shape, 1.0)
    pred = random_blobs(rng, shape, 1.0) | ref & random_blobs(rng, shape, 0.0)
    ours = voxel_metrics(pred, ref, spacing)

    def tensor(mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(mask[None, None].astype(np.float32))

    dice = DiceMetric(include_background=True, reduction="none")(tensor(pred), tensor(ref))
    hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
        tensor(pred), tensor(ref), spacing=spacing
    )
    assd = SurfaceDistanceMetric(include_background=True, symmetric=True, reduction="none")(
        tensor(pred), tensor(ref), spacing=spacing
    )
    assert ours.dice == pytest.approx(float(dice), abs=1e-6)
    assert ours.hd95_mm == pytest.approx(float(hd95), abs=1e-3)
    assert ours.assd_mm == pytest.approx(float(assd), abs=1e-3)


def test_masks_touching_the_array_border() -> None:
    """Voxels on the array border are surface voxels (as in MONAI); cropping must not change that.

    Reference = slab x in 0..2 of a 6³ array, prediction = slab x in 0..3. Surface of a slab:
    both x faces in full (36 each, the x = 0 face because it touches the array border) plus the
    20-voxel ring of every slice in between: reference 36+36+20 = 92, prediction 36+36+2*20 = 112.
    """
    ref = np.zeros((6, 6, 6), dtype=bool)
    ref[:3] = True
    pred = np.zeros_like(ref)
    pred[:4] = True
    d_pr, d_rp = surface_distances(pred, ref, (1.0, 1.0, 1.0))
    assert (d_pr.size, d_rp.size) == (112, 92)
    assert d_pr.max() == pytest.approx(1.0) and d_rp.max() == pytest.approx(1.0)
