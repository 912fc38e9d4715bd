"""Whole-volume 2.5D sliding-window prediction: ``predict_volume``.

A volume (C, R, A, S) is cut into slices normal to one axis; each slice with its ``context``
neighbours on both sides forms a (C * (2k + 1), H, W) input (``medseg.transforms.preprocessing.
context_stack``: neighbour-major channel order, edge slices replicated). Batches of these
stacks go through MONAI's ``SlidingWindowInferer``; only one batch of stacks exists at a
time, so memory grows with the volume (one slice-major copy of the input, the output), never
with the number of 2.5D copies. On a GPU the input copy, the stacks and the output live on the
device (a 512x512x600 CT: about 1.9 GB of float32 there) and come back once.

Window: ``InferenceConfig.roi_size``, shrunk to the slice when the slice is smaller, so a
slice that fits is predicted by one window over the whole slice. Overlapping 256-windows at
overlap 0.5 compute 2.25x the pixels of that one window (docs/benchmarks.md). Larger slices
are tiled with ``overlap`` and Gaussian blending.

Placement: a network with stride-2 pooling is not shift-equivariant; its mask depends on the
slice's offset modulo the deepest stride (32 px for the U-Nets: a 16-px shift changed a trained
model's BraTS mask by Dice 0.027, a 32-px shift by 0.003). ``window_padding`` puts each slice
on that grid where MONAI's inferer with the configured ROI would put it -- centred when smaller
than the ROI, from its first pixel otherwise -- edge-padding only up to the next stride
multiple. So the one-window shortcut gives the masks of the ROI-sized window it replaces.

Probabilities: sigmoid of the logits for one output channel, softmax over channels for more.
Flip TTA and several models are averaged in probability space (float32). With several
models and ``InferenceConfig.cascade`` the models after the first run only on the slices and
in-plane boxes where the first is not confidently background (:mod:`.cascade`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

from medseg.config import InferenceConfig
from medseg.inference.cascade import CascadeStats, cascade_refine
from medseg.runtime import autocast_dtype, resolve_device

CPU_BATCH = 4  # windows per forward on CPU: 48 slices/s at 4 vs 37 at 16 (docs/benchmarks.md)
CUDA_BATCH = 32


def default_batch_size(device: torch.device) -> int:
    return CUDA_BATCH if device.type == "cuda" else CPU_BATCH


def logits_to_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W) logits -> float32 probabilities: sigmoid for K == 1, softmax over K else."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


class EnsembleProbability:
    """Callable network for the inferer: (N, Cin, h, w) -> (N, K, h, w) mean probabilities.

    Averages ``models`` x (plain + each flip of ``flips``) in probability space. ``flips``:
    in-plane axes to flip (0 -> dim 2, 1 -> dim 3); the prediction is flipped back before
    averaging. ``amp``: autocast dtype or None.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        flips: Sequence[Sequence[int]] = (),
        amp: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        if not models:
            raise ValueError("at least one model is needed")
        self.models = list(models)
        self.flips: list[tuple[int, ...]] = [(), *(tuple(2 + a for a in f) for f in flips)]
        self.amp = amp
        self.channels_last = channels_last

    def _forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.amp is None:
            return model(x)
        with torch.autocast(x.device.type, dtype=self.amp):
            return model(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        total: torch.Tensor | None = None
        for model in self.models:
            for dims in self.flips:
                xi = torch.flip(x, dims) if dims else x
                prob = logits_to_probabilities(self._forward(model, xi))
                if dims:
                    prob = torch.flip(prob, dims)
                total = prob if total is None else total.add_(prob)
        assert total is not None
        n = len(self.models) * len(self.flips)
        return total.div_(n) if n > 1 else total


class SliceStacks:
    """2.5D inputs of slices ``start:stop`` as views of one slice-major copy of the volume.

    ``volume``: (C, ...) with slices along ``axis``. Same values and channel order as
    ``medseg.transforms.preprocessing.context_stack`` (neighbour offset major, modality minor, edges
    replicated). The copy is made once, with ``context`` replicated edge slices at both ends,
    in a layout where the 2.5D stack of slice i is one run of memory:

    - NCHW: (S + 2k, C, H, W); slice i's stack is the (2k + 1) * C planes starting at plane i * C;
    - NHWC (``channels_last``): (H, W, S + 2k, C); at each pixel, slice i's stack is the
      (2k + 1) * C values starting at i * C.

    ``plane_padding``: ((top, bottom), (left, right)) edge-replicated pixels around each slice
    (``window_padding``); the stacks are (N, Cin, H + top + bottom, W + left + right).

    So a batch of consecutive slices is an ``as_strided`` view (no gather, no index tensor),
    and the only per-batch work is the one copy that makes it dense in the model's memory
    format: (N, Cin, H, W), channels_last memory when ``channels_last``.
    """

    def __init__(
        self,
        volume: torch.Tensor,
        axis: int,
        context: int,
        channels_last: bool,
        plane_padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
    ) -> None:
        plane = [a for a in range(1, 4) if a != axis]
        self.context, self.channels_last = context, channels_last
        self.n_slices = volume.shape[axis]
        self.channels = volume.shape[0]
        self.plane = tuple(volume.shape[a] + sum(pad) for a, pad in zip(plane, plane_padding, strict=True))
        slice_dim, plane_dims = (2, (0, 1)) if channels_last else (0, (2, 3))
        order = (*plane, axis, 0) if channels_last else (axis, 0, *plane)
        ordered = volume.permute(order)  # (H, W, S, C) or (S, C, H, W)
        padding = [(0, 0)] * 4
        padding[slice_dim] = (context, context)
        for dim, pad in zip(plane_dims, plane_padding, strict=True):
            padding[dim] = pad
        self.slices = edge_padded_copy(ordered, padding)

    def __call__(self, start: int, stop: int, box: tuple[slice, slice] | None = None) -> torch.Tensor:
        """Stacks of slices ``start:stop``: (N, Cin, H, W) of the padded plane, or only its
        ``box`` (rows, columns of the padded plane; a cascade's second pass): (N, Cin, h, w)."""
        n, c, k = stop - start, self.channels, self.context
        h, w = self.plane
        cin = c * (2 * k + 1)
        base = self.slices
        if self.channels_last:
            s_padded = base.shape[2]
            view = base.as_strided((n, h, w, cin), (c, w * s_padded * c, s_padded * c, 1), base.storage_offset() + start * c)
            if box is not None:
                view = view[:, box[0], box[1]]
            return view.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)  # (N, Cin, H, W), NHWC memory
        view = base.as_strided((n, cin, h, w), (c * h * w, h * w, w, 1), base.storage_offset() + start * c * h * w)
        if box is not None:
            view = view[:, :, box[0], box[1]]
        return view.contiguous()


def edge_padded_copy(x: torch.Tensor, padding: Sequence[tuple[int, int]]) -> torch.Tensor:
    """A contiguous copy of ``x`` with ``padding[d] = (before, after)`` edge-replicated elements
    on each dim ``d`` (``F.pad(mode="replicate")`` for any number of dims, in one allocation)."""
    out = x.new_empty([n + before + after for n, (before, after) in zip(x.shape, padding, strict=True)])
    inner = out
    for d, (before, _) in enumerate(padding):
        inner = inner.narrow(d, before, x.shape[d])
    inner.copy_(x)
    # one dim at a time, outward from the copy: dims < d are already padded, dims > d not yet
    for d, (before, after) in enumerate(padding):
        if not (before or after):
            continue
        region = out
        for e in range(d + 1, x.ndim):
            region = region.narrow(e, padding[e][0], x.shape[e])
        n = x.shape[d]
        if before:
            region.narrow(d, 0, before).copy_(region.narrow(d, before, 1).expand_as(region.narrow(d, 0, before)))
        if after:
            tail = region.narrow(d, before + n, after)
            tail.copy_(region.narrow(d, before + n - 1, 1).expand_as(tail))
    return out


def network_stride(models: Sequence[nn.Module]) -> int:
    """Pixels the networks' pooling grid repeats over: the lcm of their ``multiple`` (the deepest
    encoder stride of medseg's models; 1 for a network without one)."""
    return math.lcm(*(int(getattr(model, "multiple", 1)) for model in models))


def window_padding(plane: Sequence[int], roi_size: Sequence[int], stride: int) -> tuple[tuple[int, int], ...]:
    """(before, after) edge padding per in-plane dim that puts a slice on the network's
    ``stride``-pixel pooling grid where MONAI's sliding-window inferer with ``roi_size`` puts it.

    The inferer pads a dim smaller than the ROI by ``(roi - n) // 2`` before it (centred), so the
    slice starts at that offset modulo ``stride``; ``before`` is that offset and ``after`` fills up to
    the next multiple of ``stride``. A dim at least the ROI is tiled from pixel 0: no padding (the
    network pads a window's far edge itself). E.g. 162 rows, ROI 256, stride 32: (15, 15).
    """
    pads = []
    for n, roi in zip(plane, roi_size, strict=True):
        if n >= roi or stride <= 1:
            pads.append((0, 0))
            continue
        before = ((roi - n) // 2) % stride
        pads.append((before, -(before + n) % stride))
    return tuple(pads)


def effective_roi(roi_size: Sequence[int], plane: Sequence[int]) -> tuple[int, int]:
    """Window actually used: ``roi_size`` shrunk to the slice (H, W) where the slice is smaller."""
    return (min(int(roi_size[0]), int(plane[0])), min(int(roi_size[1]), int(plane[1])))


def prepare_models(models: Sequence[nn.Module], device: str | torch.device | None, channels_last: bool) -> list[nn.Module]:
    """For repeated inference: eval mode, on ``device``, optionally channels_last weights (in place)."""
    dev = resolve_device(device)
    for model in models:
        model.eval().to(dev)
        if channels_last:
            model.to(memory_format=torch.channels_last)
    return list(models)


@torch.inference_mode()
def predict_volume(
    models: Sequence[nn.Module],
    image: torch.Tensor,
    context: int,
    cfg: InferenceConfig,
    device: str | torch.device | None,
    axis: int = -1,
    progress: Callable[[int], None] | None = None,
    on_cascade: Callable[[CascadeStats], None] | None = None,
) -> torch.Tensor:
    """Probabilities of every voxel of ``image`` from 2.5D sliding-window prediction.

    ``models``: networks ``(B, C * (2 * context + 1), H, W) -> (B, K, H, W)`` logits (all with
    the same K; their probabilities are averaged). ``image``: (C, R, A, S) float32 (a MetaTensor
    is fine; its meta is not used). ``axis``: spatial slicing axis as an index of ``image``
    (-1 = S = axial slices, 1 = R = sagittal, 2 = A = coronal). ``cfg``: window, overlap,
    batch, precision, TTA, cascade. ``device``: where the models run (``None`` = CUDA if available).
    ``progress``: called with the number of slices done after each batch (on a GPU: queued;
    with a cascade: of the first model's pass).

    Two or more models with ``cfg.cascade``: the first model predicts every slice and the others
    only the boxes where it is not confidently background (:mod:`.cascade`); ``on_cascade`` is then
    called once with what they skipped (:class:`.cascade.CascadeStats`). Otherwise every model
    runs on every slice (``on_cascade`` is not called).

    Returns a CPU float32 tensor: (R, A, S) foreground probability when K == 1, else
    (K, R, A, S) class probabilities (softmax over K); stored slice-major, so it is a strided
    view unless the slicing axis comes first (call ``.contiguous()`` if that matters). Models run in eval mode (their
    train/eval state is restored afterwards, so a trainer can call this for validation); a
    model whose weights are not on ``device`` is moved there. For repeated calls, run
    ``prepare_models`` once (channels_last weights).
    """
    dev = resolve_device(device)
    compiled = cfg.backend not in ("torch", "auto")  # a compiled runtime: its own precision and threads
    amp = None if compiled else autocast_dtype(cfg.precision, dev)
    flips = cfg.tta_flips if cfg.tta else ()
    cascade = cfg.cascade and len(models) >= 2
    first = EnsembleProbability(models[:1] if cascade else models, flips, amp, cfg.channels_last)
    rest = EnsembleProbability(models[1:], flips, amp, cfg.channels_last) if cascade else None
    with evaluating(models, dev), torch_threads(1 if compiled and dev.type == "cpu" else None):
        return _predict(first, rest, network_stride(models), image, context, cfg, dev, axis, progress, on_cascade)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the block (``None``: unchanged), restored
    afterwards. A compiled runtime has its own thread pool: torch's workers, spinning after each
    small op between batches, would take its cores (one BraTS fold, network part on 2 cores:
    ONNX Runtime int8 0.85 s with them, 0.37 s without; OpenVINO fp32 0.83 s / 0.66 s)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(before)


@contextmanager
def evaluating(models: Sequence[nn.Module], dev: torch.device) -> Iterator[None]:
    """``models`` in eval mode on ``dev`` (moved there when a weight is elsewhere) for the block;
    each model's train/eval state is restored afterwards (a trainer validates through this)."""
    was_training = [m.training for m in models]
    for model in models:
        model.eval()
        if any(p.device != dev for p in model.parameters()):
            model.to(dev)
    try:
        yield
    finally:
        for model, training in zip(models, was_training, strict=True):
            model.train(training)


def window_predictor(
    network: EnsembleProbability, plane: Sequence[int], cfg: InferenceConfig, dev: torch.device, batch: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The callable that predicts (N, Cin, h, w) inputs of in-plane size ``plane`` = (h, w):
    ``network`` itself when one window covers them, else MONAI's ``SlidingWindowInferer`` over
    them with ``cfg``'s window (shrunk to the plane where smaller), overlap and blending."""
    roi = effective_roi(cfg.roi_size, plane)
    # one window covering the slice: blending weights are constant, so the inferer's padding,
    # importance map and weighted accumulation are pure overhead (predict of a BraTS case on
    # the CPU: 2.06 s -> 1.76 s); the network then runs on the whole slices -- same probabilities
    if tuple(roi) == tuple(plane):
        return network
    inferer = SlidingWindowInferer(
        roi_size=roi,
        sw_batch_size=batch,
        overlap=cfg.overlap,
        mode=cfg.blend,
        sw_device=dev,
        device=dev,
        cache_roi_weight_map=True,
    )
    return partial(inferer, network=network)


class BoxPass:
    """A cascade's second pass (:func:`.cascade.cascade_refine`'s ``rest``): (N, K, h, w)
    probabilities of ``network`` on slices ``start:stop`` cut to a ``box`` (rows, columns) of the
    padded plane, tiled like a full slice when larger than the window. One window predictor per
    box size, reused (whole kept slices, the default, are all one size)."""

    def __init__(self, network: EnsembleProbability, stacks: SliceStacks, cfg: InferenceConfig, dev: torch.device,
                 batch: int) -> None:  # fmt: skip
        self.network, self.stacks, self.cfg, self.dev, self.batch = network, stacks, cfg, dev, batch
        self.predictors: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, start: int, stop: int, box: tuple[slice, slice]) -> torch.Tensor:
        shape = (box[0].stop - box[0].start, box[1].stop - box[1].start)
        if shape not in self.predictors:
            self.predictors[shape] = window_predictor(self.network, shape, self.cfg, self.dev, self.batch)
        return self.predictors[shape](self.stacks(start, stop, box))


def _predict(
    network: EnsembleProbability,
    rest: EnsembleProbability | None,
    stride: int,
    image: torch.Tensor,
    context: int,
    cfg: InferenceConfig,
    dev: torch.device,
    axis: int,
    progress: Callable[[int], None] | None,
    on_cascade: Callable[[CascadeStats], None] | None,
) -> torch.Tensor:
    """``predict_volume``'s body: batches of 2.5D stacks through ``network`` into one output, then,
    with ``rest`` (the other models of a cascade), its boxes (:func:`.cascade.cascade_refine`).
    ``stride``: the pooling grid of every model, so the padding is the full ensemble's."""
    volume = image.as_tensor() if hasattr(image, "as_tensor") else image  # MetaTensor ops are slow
    if volume.ndim != 4:
        raise ValueError(f"image must be (C, R, A, S), got shape {tuple(volume.shape)}")
    spatial_axis = axis % 4
    if spatial_axis == 0:
        raise ValueError("axis must name a spatial axis of (C, R, A, S): 1, 2, 3 or -1")
    n_slices = volume.shape[spatial_axis]
    plane = [s for i, s in enumerate(volume.shape[1:], start=1) if i != spatial_axis]
    batch = cfg.batch_size or default_batch_size(dev)
    padding = window_padding(plane, cfg.roi_size, stride)
    padded_plane = [n + before + after for n, (before, after) in zip(plane, padding, strict=True)]
    predict = window_predictor(network, padded_plane, cfg, dev, batch)

    # on a GPU the volume goes over once and the stacks and the output stay there: no host work
    # and no synchronising copy per batch (the CPU queues the batches while the GPU runs them)
    stacks = SliceStacks(volume.to(dev), spatial_axis, context, cfg.channels_last, padding)
    (top, _), (left, _) = padding
    out: torch.Tensor | None = None  # (K, n_slices, H, W) on ``dev``, filled batch by batch
    for start in range(0, n_slices, batch):
        stop = min(start + batch, n_slices)
        prob = predict(stacks(start, stop))  # (N, Cin, H', W') -> (N, K, H', W'), padded plane
        prob = prob[:, :, top : top + plane[0], left : left + plane[1]]
        if out is None:
            out = torch.empty((prob.shape[1], n_slices, *plane), dtype=torch.float32, device=dev)
        out[:, start:stop] = prob.transpose(0, 1)
        if progress is not None:
            progress(stop)
    assert out is not None
    if rest is not None:
        stats = cascade_refine(
            out, BoxPass(rest, stacks, cfg, dev, batch), len(network.models) + len(rest.models), padding,
            stride, cfg.cascade_threshold, cfg.cascade_margin_slices, cfg.cascade_margin_px, batch,
        )
        if on_cascade is not None:
            on_cascade(stats)
    del stacks
    out = torch.movedim(out.cpu(), 1, spatial_axis)  # back to the axis order of ``image`` (a strided view)
    return out[0] if out.shape[0] == 1 else out
