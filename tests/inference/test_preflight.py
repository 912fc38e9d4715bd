"""Preflight's grid check: channels whose headers put them on different grids are refused before
any inference, by the reader's own rule (medseg.geometry.grid_mismatch)."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from medseg.config import InferenceConfig
from medseg.inference.cases import InferenceCase
from medseg.inference.preflight import case_problem


def _write(path, affine):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 4)).astype(np.float32), affine), str(path))
    return path


def test_channels_on_different_grids_are_refused_and_one_grid_passes(tmp_path):
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    flair, t1, moved = _write(tmp_path / "f.nii.gz", np.eye(4)), _write(tmp_path / "t.nii.gz", np.eye(4)), \
        _write(tmp_path / "m.nii.gz", shifted)  # fmt: skip
    cfg = InferenceConfig()
    assert case_problem(InferenceCase("a", {"flair": flair, "t1": t1}), ["flair", "t1"], "MR", cfg) is None
    problem = case_problem(InferenceCase("b", {"flair": flair, "t1": moved}), ["flair", "t1"], "MR", cfg)
    assert problem.startswith("channels are on different grids (different affines (max difference 2 mm))")
    assert str(moved) in problem and "resample them onto one grid first" in problem
