"""Fold-ensemble cascade: the other models run only where the first one is not sure of background.

``predict_volume`` (:mod:`.predictor`) with several models and ``InferenceConfig.cascade``:

1. the first model predicts every slice, exactly as a one-model ``predict_volume`` would (same
   2.5D stacks, window padding, flips); its probabilities are ``prob`` (K, S, H, W), slice-major;
2. :func:`cascade_refine`: a slice is *hot* when its foreground (K == 1: the probability; K > 1:
   ``1 - p_background``) reaches ``threshold`` anywhere; a slice is *kept* when a hot slice lies
   within ``margin_slices`` of it, else *skipped* (the first model's probability stands);
3. kept slices, in runs of consecutive slices cut into batches of at most ``batch``, go through
   the other models on one in-plane box per batch: the bounding box of the hot pixels of the
   batch's slices and their ``margin_slices`` neighbours, grown by ``margin_px`` and snapped
   outward to the network's ``stride``-pixel pooling grid, in the coordinates of the padded plane
   that ``window_padding`` makes (so the networks see the pooling grid of the full-slice pass);
   ``margin_px`` ``None`` (the default setting): the whole padded plane, i.e. whole kept slices;
4. inside each box the output is the mean of all models, ``(p_first + (M - 1) * p_rest) / M``
   (``p_rest``: the mean of the other M - 1 models, flips included: the same average as
   ``EnsembleProbability`` over all M), elsewhere the first model's probability.

The box pass is a callable ``rest(start, stop, box) -> (N, K, h, w)`` given by the caller (the
predictor's stacks and windows, tiling included), so this module is torch only and knows nothing
of models or backends. Exactness: with whole slices, the full ensemble's values on every kept
slice; with boxes, only for a fully convolutional network whose receptive field reaches at most
``margin_px`` pixels. DeepLabV3+'s image-pooling branch averages the whole slice, so a box changes
its output everywhere: on the BraTS 5-fold DeepLabV3+ folder, 32-px boxes gave masks with Dice
0.961-0.988 to the full ensemble (docs/benchmarks.md), whole slices 1.000.

Work counted in :class:`CascadeStats`: slices and (slice x padded-plane pixel) positions the other
models ran on, against running them on every pixel of every slice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Box = tuple[slice, slice]  # (rows, columns) of the padded plane


@dataclass(frozen=True)
class CascadeStats:
    """What the other models of a cascade skipped on one volume.

    ``n_slices``: slices of the volume; ``slices_run``: slices the other models predicted;
    ``pixels_run``: slice x pixel positions they predicted (their boxes); ``pixels_total``:
    slices x padded-plane pixels (what the full ensemble runs them on).
    """

    n_slices: int
    slices_run: int
    pixels_run: int
    pixels_total: int

    @property
    def slices_skipped(self) -> float:
        """Fraction of slices the other models did not predict (0..1)."""
        return 1.0 - self.slices_run / self.n_slices if self.n_slices else 0.0

    @property
    def pixels_skipped(self) -> float:
        """Fraction of slice x pixel work the other models did not do (0..1)."""
        return 1.0 - self.pixels_run / self.pixels_total if self.pixels_total else 0.0

    def as_record(self) -> dict[str, Any]:
        """JSON-ready numbers for run records and case markers."""
        return {"slices_skipped": round(self.slices_skipped, 4), "pixels_skipped": round(self.pixels_skipped, 4),
                "slices_run": self.slices_run, "n_slices": self.n_slices}


def foreground(prob: torch.Tensor) -> torch.Tensor:
    """(K, S, H, W) probabilities -> (S, H, W) foreground: ``prob[0]`` for K == 1 (sigmoid),
    ``1 - prob[0]`` (not background) for K > 1 (softmax)."""
    return prob[0] if prob.shape[0] == 1 else 1.0 - prob[0]


def kept_slices(hot: torch.Tensor, margin: int) -> torch.Tensor:
    """(S,) bool hot slices -> (S,) bool slices within ``margin`` slices of a hot one (a 1-D
    dilation)."""
    if margin <= 0 or not bool(hot.any()):
        return hot.clone()
    grown = torch.nn.functional.max_pool1d(hot.float()[None, None], 2 * margin + 1, stride=1, padding=margin)
    return grown[0, 0] > 0


def slice_batches(kept: torch.Tensor, batch: int) -> list[tuple[int, int]]:
    """(S,) bool -> ``(start, stop)`` of the runs of consecutive kept slices, each run cut into
    pieces of at most ``batch`` slices. E.g. kept at 2..7 and 9, batch 4: (2, 6), (6, 8), (9, 10)."""
    flags = kept.to("cpu", torch.bool).tolist()
    out: list[tuple[int, int]] = []
    i, n = 0, len(flags)
    while i < n:
        if not flags[i]:
            i += 1
            continue
        j = i
        while j < n and flags[j]:
            j += 1
        out.extend((s, min(s + batch, j)) for s in range(i, j, batch))
        i = j
    return out


def snapped_span(first: int, last: int, offset: int, margin: int, stride: int, size: int) -> slice:
    """Pixels ``first..last`` (inclusive, unpadded plane) -> the padded-plane span covering them
    grown by ``margin`` and snapped outward to multiples of ``stride``, within ``[0, size)``.

    E.g. first 40, last 50, offset (padding before) 15, margin 8, stride 32, size 192:
    padded 55..65 -> 47..74 -> slice(32, 96)."""
    start = max(0, first + offset - margin)
    stop = min(size, last + 1 + offset + margin)
    start = start // stride * stride
    stop = min(size, -(-stop // stride) * stride)
    return slice(start, stop)


def cascade_refine(
    prob: torch.Tensor,
    rest: Callable[[int, int, Box], torch.Tensor],
    n_models: int,
    padding: Sequence[tuple[int, int]],
    stride: int,
    threshold: float,
    margin_slices: int,
    margin_px: int | None,
    batch: int,
) -> CascadeStats:
    """Step 2-4 of the module docstring, in place on ``prob``.

    ``prob``: (K, S, H, W) float32 first-model probabilities, slice-major, unpadded plane; becomes
    the cascade's output. ``rest(start, stop, box)``: mean probabilities (N, K, h, w) of the other
    ``n_models - 1`` models on slices ``start:stop`` cut to ``box`` of the padded plane (h, w = the
    box's size). ``padding``: ((top, bottom), (left, right)) of the padded plane
    (``window_padding``); ``stride``: the networks' pooling grid (``network_stride``).
    Returns what the other models skipped.
    """
    if n_models < 2:
        raise ValueError(f"a cascade needs at least 2 models, got {n_models}")
    _, n_slices, height, width = prob.shape
    (top, bottom), (left, right) = padding
    padded = (height + top + bottom, width + left + right)
    hot = foreground(prob) >= threshold  # (S, H, W)
    hot_rows, hot_cols = hot.any(dim=2).cpu(), hot.any(dim=1).cpu()  # (S, H), (S, W): one copy back
    del hot
    kept = kept_slices(hot_rows.any(dim=1), margin_slices)
    slices_run = pixels_run = 0
    for start, stop in slice_batches(kept, batch):
        lo, hi = max(0, start - margin_slices), min(n_slices, stop + margin_slices)
        rows = torch.nonzero(hot_rows[lo:hi].any(dim=0)).flatten()
        cols = torch.nonzero(hot_cols[lo:hi].any(dim=0)).flatten()
        if margin_px is None:  # whole kept slices: exact for any network
            box = (slice(0, padded[0]), slice(0, padded[1]))
        else:
            box = (snapped_span(int(rows[0]), int(rows[-1]), top, margin_px, stride, padded[0]),
                   snapped_span(int(cols[0]), int(cols[-1]), left, margin_px, stride, padded[1]))  # fmt: skip
        others = rest(start, stop, box)  # (N, K, h, w) on the padded box
        # the part of the box on the unpadded plane, in box and in plane coordinates
        r0, r1 = max(box[0].start, top), min(box[0].stop, top + height)
        c0, c1 = max(box[1].start, left), min(box[1].stop, left + width)
        inner = others[:, :, r0 - box[0].start : r1 - box[0].start, c0 - box[1].start : c1 - box[1].start]
        target = prob[:, start:stop, r0 - top : r1 - top, c0 - left : c1 - left]
        target.add_(inner.transpose(0, 1).to(target.device), alpha=n_models - 1).div_(n_models)
        slices_run += stop - start
        pixels_run += (stop - start) * (box[0].stop - box[0].start) * (box[1].stop - box[1].start)
    return CascadeStats(n_slices, slices_run, pixels_run, n_slices * padded[0] * padded[1])
