from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medseg.geometry import max_diameter_mm
from medseg.stats.lesions import case_lesion_stats, foreground_extent, lesion_distribution_curve


def test_hand_computed_case_statistics():
    mask = np.zeros((20, 20, 10), dtype=np.uint8)
    mask[2:5, 2:4, 3:5] = 1  # lesion A: 3x2x2 = 12 voxels on slices 3-4
    mask[10:12, 10:12, 4] = 1  # lesion B: 2x2x1 = 4 voxels on slice 4
    mask[15, 15, 7] = 1  # lesion C: 1 voxel on slice 7
    spacing = (0.5, 0.8, 3.0)
    stats = case_lesion_stats(mask, spacing, axis=2, extent=(1, 8))
    s = stats.slices.set_index("slice")
    assert s.loc[3, "lesion_voxels"] == 6 and s.loc[4, "lesion_voxels"] == 10 and s.loc[7, "lesion_voxels"] == 1
    assert s.loc[4, "lesion_area_mm2"] == pytest.approx(10 * 0.5 * 0.8)
    assert s.loc[4, "n_components_2d"] == 2 and s.loc[3, "n_components_2d"] == 1 and s.loc[0, "n_components_2d"] == 0
    assert s.loc[4, "lesion_fraction"] == pytest.approx(10 / 400)
    assert s.loc[1, "norm_position"] == 0.0 and s.loc[8, "norm_position"] == 1.0 and np.isnan(s.loc[0, "norm_position"])
    c = stats.case
    assert c["n_lesions_3d"] == 3 and c["lesion_voxels"] == 17
    assert c["lesion_volume_ml"] == pytest.approx(17 * 0.5 * 0.8 * 3.0 / 1000)
    assert (c["slices_with_lesion"], c["first_lesion_slice"], c["last_lesion_slice"]) == (3, 3, 7)
    # lesion A spans 1.5 x 1.6 x 6 mm corner to corner
    assert c["largest_lesion_diameter_mm"] == pytest.approx(np.sqrt(1.5**2 + 1.6**2 + 6.0**2))
    assert c["largest_lesion_volume_ml"] == pytest.approx(12 * 1.2 / 1000)


def test_connectivity_settings_change_counts():
    mask = np.zeros((6, 6, 3), dtype=bool)
    mask[1, 1, 1] = mask[2, 2, 1] = True  # diagonal neighbours in-plane
    assert case_lesion_stats(mask, (1, 1, 1), connectivity_2d=8, connectivity_3d=26).case["n_lesions_3d"] == 1
    six = case_lesion_stats(mask, (1, 1, 1), connectivity_2d=4, connectivity_3d=6)
    assert six.case["n_lesions_3d"] == 2 and six.slices.loc[1, "n_components_2d"] == 2


def test_other_axes_and_empty_mask():
    mask = np.zeros((8, 9, 10), dtype=bool)
    mask[3, 2:5, 1:3] = True
    stats = case_lesion_stats(mask, (2.0, 1.0, 1.0), axis=0)
    assert len(stats.slices) == 8 and stats.slices.loc[3, "lesion_area_mm2"] == 6.0
    empty = case_lesion_stats(np.zeros((4, 4, 4), bool), (1, 1, 1))
    assert empty.case["n_lesions_3d"] == 0 and empty.case["first_lesion_slice"] == -1
    assert empty.case["largest_lesion_diameter_mm"] == 0.0


def test_extent_always_covers_lesion_slices():
    mask = np.zeros((5, 5, 10), dtype=bool)
    mask[2, 2, 9] = True
    stats = case_lesion_stats(mask, (1, 1, 1), extent=(2, 6))
    assert stats.case["extent_last"] == 9 and stats.case["lesion_slices_outside_foreground"] == 1


def test_max_diameter_large_sphere_uses_hull():
    zz, yy, xx = np.ogrid[:41, :41, :41]
    sphere = (xx - 20) ** 2 + (yy - 20) ** 2 + (zz - 20) ** 2 <= 18**2
    d = max_diameter_mm(sphere, (0.5, 0.5, 0.5))
    assert 18.5 <= d <= 19.5  # 37 voxels * 0.5 mm, plus at most the corner overhang


def test_foreground_extent_ct_threshold():
    image = np.full((10, 10, 20), -1000.0)
    image[2:8, 2:8, 5:15] = 40.0
    first, last, thr = foreground_extent(image, 2, "CT")
    assert (first, last, thr) == (5, 14, -500.0)


def test_curve_aggregation():
    rows = []
    for case_id, areas in (("a", [0, 10, 20, 10, 0]), ("b", [0, 0, 40, 0, 0])):
        n = len(areas)
        rows.append(pd.DataFrame({"case_id": case_id, "slice": range(n), "in_extent": True,
                                  "norm_position": np.linspace(0, 1, n), "lesion_area_mm2": areas}))
    curve, per_case = lesion_distribution_curve(pd.concat(rows), n_bins=5)
    assert curve["mean"].tolist() == [0, 5, 30, 5, 0]
    assert curve["share_with_lesion"].tolist() == [0, 0.5, 1, 0.5, 0]
    assert curve["q25"].iloc[2] == pytest.approx(25) and curve["q75"].iloc[2] == pytest.approx(35)
    assert len(per_case) == 10
