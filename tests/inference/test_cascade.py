"""Fold-ensemble cascade (medseg.inference.cascade through predict_volume): the other models run
only on the boxes around the first model's lesion; there the result is the full ensemble's.

The toy networks are fully convolutional with a known reach: the centre slice's channel is
average-pooled on a ``multiple``-pixel grid (so, like the U-Nets, they are not shift-equivariant),
convolved with a (2r + 1)^2 positive kernel, upsampled back; their reach is (r + 1) * multiple
pixels, below ``cascade_margin_px``. Expectations are computed from the full ensemble
(``cascade=False``) and from one-model predictions, and by hand for the slice counts.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_affine, write_nifti
from infer_helpers import CT_LEVEL, ChannelThreshold, ct_phantom
from torch import nn

from medseg.config import Config, InferenceConfig, PreprocessConfig
from medseg.inference import predict_volume
from medseg.inference.cascade import CascadeStats, kept_slices, slice_batches, snapped_span
from medseg.inference.case_files import read_marker
from medseg.inference.cases import InferenceCase
from medseg.inference.runner import InferenceBundle, run_inference
from medseg.io import read_volume
from medseg.outputs import INFERENCE_RECORD, MASK_SUFFIX

THRESHOLD, MARGIN_SLICES, MARGIN_PX = 0.05, 2, 18  # 18: the unsnapped box is off the 4-px grid


class PooledBlob(nn.Module):
    """(N, Cin, H, W) -> (N, K, H, W) logits. Class k >= 1 (or the one sigmoid output) is
    ``gain * (y_k - level)``, ``y_k``: input channel ``channels[k]`` average-pooled on a
    ``multiple`` grid (far edges replicated up to a multiple), convolved with a seeded positive
    (2r + 1)^2 kernel summing to 1 (zero padding), nearest-upsampled. Multi-class: background
    logit 0 before the classes."""

    def __init__(self, channels: list[int], multiple: int, seed: int, level: float = 0.5, gain: float = 10.0,
                 radius: int = 1, multiclass: bool = False) -> None:
        super().__init__()
        self.channels, self.multiple, self.level, self.gain = channels, multiple, level, gain
        self.multiclass = multiclass
        kernel = torch.rand((len(channels), 1, 2 * radius + 1, 2 * radius + 1), generator=torch.Generator().manual_seed(seed)) + 0.5
        self.kernel = nn.Parameter(kernel / kernel.sum(dim=(2, 3), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        m = self.multiple
        y = x[:, self.channels].float()
        y = F.pad(y, (0, -w % m, 0, -h % m), mode="replicate")
        y = F.avg_pool2d(y, m)
        y = F.conv2d(y, self.kernel, padding=self.kernel.shape[-1] // 2, groups=len(self.channels))
        y = F.interpolate(y, scale_factor=m, mode="nearest")[:, :, :h, :w]
        logits = self.gain * (y - self.level)
        if self.multiclass:
            logits = torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)
        return logits


def _models(n: int = 3, multiple: int = 4, channels: tuple[int, ...] = (1,), multiclass: bool = False) -> list[nn.Module]:
    return [PooledBlob(list(channels), multiple, seed=i, level=0.5 + 0.05 * i, gain=20.0, multiclass=multiclass)
            for i in range(n)]


def _blob_volume(shape=(1, 80, 84, 24), blobs=((0, slice(8, 12)),)) -> torch.Tensor:
    """(C, R, A, S) seeded texture in [0, 0.2) (so a box's zero padding and its place on the pooling
    grid matter) with a bright in-plane block (rows 37..44, cols 35..48) on the slices of each
    ``(channel, slices)`` in ``blobs``."""
    volume = torch.rand(shape, generator=torch.Generator().manual_seed(7)) * 0.2
    for channel, slices in blobs:
        volume[channel, 37:45, 35:49, slices] = 1.0
    return volume


def _cfg(**kwargs) -> InferenceConfig:
    base = {"precision": "fp32", "batch_size": 4, "cascade_threshold": THRESHOLD,
            "cascade_margin_slices": MARGIN_SLICES, "cascade_margin_px": MARGIN_PX}
    return InferenceConfig(**{**base, **kwargs})


def _run(models, volume, cfg, context=1) -> tuple[torch.Tensor, list[CascadeStats]]:
    stats: list[CascadeStats] = []
    prob = predict_volume(models, volume, context, cfg, "cpu", on_cascade=stats.append)
    return prob, stats


def _hot_box(fg: np.ndarray) -> tuple[slice, slice]:
    """In-plane bounding box of the pixels >= THRESHOLD over every slice of (R, A, S) ``fg``."""
    rows = np.nonzero((fg >= THRESHOLD).any(axis=(1, 2)))[0]
    cols = np.nonzero((fg >= THRESHOLD).any(axis=(0, 2)))[0]
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_boxes_hold_the_full_ensemble_and_masks_are_equal(tta):
    volume = _blob_volume()
    models = _models()
    full, none = _run(models, volume, _cfg(cascade=False, tta=tta))
    cascade, stats = _run(models, volume, _cfg(tta=tta))
    first, _ = _run(models[:1], volume, _cfg(tta=tta))
    assert none == [] and len(stats) == 1
    assert cascade.shape == full.shape == volume.shape[1:] and cascade.dtype == torch.float32
    np.testing.assert_array_equal(cascade.numpy() >= 0.5, full.numpy() >= 0.5)
    assert (full.numpy() >= 0.5).sum() > 100  # there is a lesion to agree on
    rows, cols = _hot_box(first.numpy())
    np.testing.assert_allclose(cascade[rows, cols, 6:14].numpy(), full[rows, cols, 6:14].numpy(), atol=1e-6)
    # outside the kept slices the first model's probability stands (it differs from the mean)
    skipped = [s for s in range(24) if not 6 <= s < 14]
    np.testing.assert_array_equal(cascade[..., skipped].numpy(), first[..., skipped].numpy())
    assert not np.allclose(first[..., skipped].numpy(), full[..., skipped].numpy(), atol=1e-4)


def test_skipped_fractions_are_the_slices_and_boxes_by_hand():
    volume = _blob_volume()  # the blob on slices 8..11 only; the models see the centre slice
    models = _models()
    _, (stats,) = _run(models, volume, _cfg())
    first, _ = _run(models[:1], volume, _cfg())
    # hot 8..11, +-2 margin: 6..13 kept = 8 of 24 slices, in batches (6, 10) and (10, 14)
    assert (stats.n_slices, stats.slices_run) == (24, 8) and stats.slices_skipped == pytest.approx(16 / 24)
    # the plane (80, 84) padded by window_padding on the 4-px grid (ROI 512): rows (0, 0), columns (2, 2)
    rows, cols = _hot_box(first.numpy())
    row_span = (max(0, rows.start - MARGIN_PX) // 4 * 4, min(80, -(-(rows.stop + MARGIN_PX) // 4) * 4))
    col_span = (max(0, cols.start + 2 - MARGIN_PX) // 4 * 4, min(88, -(-(cols.stop + 2 + MARGIN_PX) // 4) * 4))
    box_area = (row_span[1] - row_span[0]) * (col_span[1] - col_span[0])
    assert box_area < 80 * 88 / 2
    assert stats.pixels_total == 24 * 80 * 88
    assert stats.pixels_run == 8 * box_area
    assert stats.pixels_skipped == pytest.approx(1 - 8 * box_area / (24 * 80 * 88))


def test_a_volume_without_lesion_runs_the_first_model_only():
    volume = _blob_volume(blobs=())
    models = _models()
    cascade, (stats,) = _run(models, volume, _cfg())
    first, _ = _run(models[:1], volume, _cfg())
    assert stats.slices_run == 0 and stats.slices_skipped == 1.0 and stats.pixels_skipped == 1.0
    np.testing.assert_array_equal(cascade.numpy(), first.numpy())


def test_one_model_is_unchanged():
    volume = _blob_volume()
    model = _models(1)
    with_cascade, stats = _run(model, volume, _cfg(cascade=True))
    without, _ = _run(model, volume, _cfg(cascade=False))
    assert stats == []
    np.testing.assert_array_equal(with_cascade.numpy(), without.numpy())


def test_cascade_false_is_the_full_ensemble():
    volume = _blob_volume()
    models = _models()
    full, stats = _run(models, volume, _cfg(cascade=False))
    singles = [_run([m], volume, _cfg())[0] for m in models]
    assert stats == []
    np.testing.assert_allclose(full.numpy(), torch.stack(singles).mean(0).numpy(), atol=1e-6)


def test_tiled_slices_and_boxes_larger_than_the_window():
    """Plane 72 x 60 with a 24 x 24 window: the first pass and the boxes are both tiled."""
    volume = torch.zeros(1, 72, 60, 16)
    volume[0, 20:50, 15:45, 5:9] = 1.0
    models = _models(multiple=1)
    cfg = {"roi_size": (24, 24), "overlap": 0.5}
    full, _ = _run(models, volume, _cfg(cascade=False, **cfg))
    cascade, (stats,) = _run(models, volume, _cfg(**cfg))
    assert stats.slices_run == 8 and 0.5 < stats.pixels_skipped < 1.0
    assert stats.pixels_run // stats.slices_run > 24 * 24  # a box larger than one window
    np.testing.assert_array_equal(cascade.numpy() >= 0.5, full.numpy() >= 0.5)
    # the tiles of a box are not those of the full plane: near their edges the blending differs a little
    inside = full[25:45, 20:40, 5:9].numpy()
    np.testing.assert_allclose(cascade[25:45, 20:40, 5:9].numpy(), inside, atol=5e-3)


def test_multiclass_uses_not_background_as_foreground():
    """Class 1 from modality 0 on slices 8..11, class 2 from modality 1 on slices 19..20: both
    make their slices hot (1 - p_background), so 6..13 and 17..22 are kept: 14 of 24."""
    volume = _blob_volume(shape=(2, 80, 84, 24), blobs=((0, slice(8, 12)), (1, slice(19, 21))))
    models = _models(channels=(2, 3), multiclass=True)  # context 1, 2 modalities: the centre slice's channels
    full, _ = _run(models, volume, _cfg(cascade=False))
    cascade, (stats,) = _run(models, volume, _cfg())
    assert cascade.shape == (3, 80, 84, 24)
    np.testing.assert_allclose(cascade.sum(0).numpy(), 1.0, atol=1e-5)
    assert stats.slices_run == 14
    np.testing.assert_array_equal(cascade.argmax(0).numpy(), full.argmax(0).numpy())
    labels = set(np.unique(full.argmax(0).numpy()).tolist())
    assert labels == {0, 1, 2}


def test_helpers_by_hand():
    kept = kept_slices(torch.tensor([0, 0, 0, 1, 0, 0, 0, 0, 0, 1], dtype=torch.bool), 2)
    assert kept.tolist() == [False, True, True, True, True, True, False, True, True, True]
    assert slice_batches(kept, 3) == [(1, 4), (4, 6), (7, 10)]
    assert snapped_span(40, 50, 15, 8, 32, 192) == slice(32, 96)
    assert snapped_span(0, 5, 0, 8, 32, 40) == slice(0, 32)
    assert snapped_span(30, 39, 0, 8, 32, 40) == slice(0, 40)  # a plane edge that is no multiple


def test_batch_records_what_the_cascade_skipped(tmp_path, rng, caplog):
    """Two identity-like models on CT phantoms through run_inference: masks are the lesions,
    each marker holds the case's skipped fractions, inference.json their mean, one log line each."""
    cases = []
    for i in range(2):
        image, lesion = ct_phantom((34, 30, 24), rng)
        path = write_nifti(tmp_path / f"scan{i}.nii.gz", image, make_affine("lps", spacing=(0.8, 0.8, 2.0)))
        cases.append((InferenceCase(f"scan{i}", {"ct": path}), lesion))
    config = Config(preprocess=PreprocessConfig(context_slices=1, crop_margin=2, crop_margin_slices=1),
                    inference=InferenceConfig(min_lesion_mm3=0.0, cascade_margin_slices=1))
    models = [ChannelThreshold(1, CT_LEVEL).eval(), ChannelThreshold(1, CT_LEVEL, gain=20.0).eval()]
    bundle = InferenceBundle(models, config, ["ct"], "CT", [], torch.device("cpu"))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="medseg"):
        summary = run_inference([c for c, _ in cases], bundle, out, show_progress=False)
    assert summary.done == ["scan0", "scan1"]
    skipped = []
    for case, lesion in cases:
        np.testing.assert_array_equal(read_volume(out / f"{case.case_id}{MASK_SUFFIX}").array, lesion)
        record = read_marker(out, case.case_id)["cascade"]
        assert 0.0 < record["slices_skipped"] < 1.0 and record["slices_skipped"] <= record["pixels_skipped"] < 1.0
        skipped.append(record["slices_skipped"])
        assert sum(f"case {case.case_id}: cascade" in m for m in caplog.messages) == 1
    run = json.loads((out / INFERENCE_RECORD).read_text())["cascade"]
    assert run["enabled"] is True and run["cases"] == 2
    assert run["mean_slices_skipped"] == pytest.approx(np.mean(skipped), abs=1e-4)
