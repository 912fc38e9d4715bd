"""Whole-volume 2.5D sliding-window prediction: ``predict_volume``.

A volume (C, R, A, S) is cut into slices normal to one axis; each slice with its ``context``
neighbours on both sides forms a (C * (2k + 1), H, W) input (``medseg.preprocessing.
context_stack``: neighbour-major channel order, edge slices replicated). Batches of these
stacks go through MONAI's ``SlidingWindowInferer``; only one batch of stacks exists at a
time, so memory grows with the volume (one slice-major copy of the input, the output), never
with the number of 2.5D copies. On a GPU the input copy, the stacks and the output live on the
device (a 512x512x600 CT: about 1.9 GB of float32 there) and come back once.

Window: ``InferenceConfig.roi_size``, shrunk to the slice when the slice is smaller, so a
slice that fits is predicted by one window over the whole slice (the model pads it to its
stride multiple). Overlapping 256-windows at overlap 0.5 compute 2.25x the pixels of that one
window (docs/benchmarks.md). Larger slices are tiled with ``overlap`` and Gaussian blending.

Probabilities: sigmoid of the logits for one output channel, softmax over channels for more.
Flip TTA and several models are averaged in probability space (float32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

from medseg.config import InferenceConfig

CPU_BATCH = 4  # windows per forward on CPU: 48 slices/s at 4 vs 37 at 16 (docs/benchmarks.md)
CUDA_BATCH = 32


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cpu_has_fast_bf16() -> bool:
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; ``None`` = plain fp32.

    ``auto``: bf16 on CPUs with AVX-512 BF16 or AMX instructions (2.5x faster than fp32 on a
    6.5 M-parameter U-Net here) and on CUDA GPUs that support bf16 (else fp16); fp32 elsewhere.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_fast_bf16():
        return torch.bfloat16
    return None


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
    ``medseg.preprocessing.context_stack`` (neighbour offset major, modality minor, edges
    replicated). The copy is made once, with ``context`` replicated edge slices at both ends,
    in a layout where the 2.5D stack of slice i is one run of memory:

    - NCHW: (S + 2k, C, H, W); slice i's stack is the (2k + 1) * C planes starting at plane i * C;
    - NHWC (``channels_last``): (H, W, S + 2k, C); at each pixel, slice i's stack is the
      (2k + 1) * C values starting at i * C.

    So a batch of consecutive slices is an ``as_strided`` view (no gather, no index tensor),
    and the only per-batch work is the one copy that makes it dense in the model's memory
    format: (N, Cin, H, W), channels_last memory when ``channels_last``.
    """

    def __init__(self, volume: torch.Tensor, axis: int, context: int, channels_last: bool) -> None:
        plane = [a for a in range(1, 4) if a != axis]
        self.context, self.channels_last = context, channels_last
        self.n_slices = volume.shape[axis]
        self.channels = volume.shape[0]
        self.plane = tuple(volume.shape[a] for a in plane)
        slice_dim = 2 if channels_last else 0
        order = (*plane, axis, 0) if channels_last else (axis, 0, *plane)
        ordered = volume.permute(order)  # (H, W, S, C) or (S, C, H, W)
        edge = [context if d == slice_dim else -1 for d in range(4)]  # ``context`` copies of an end slice
        first = ordered.narrow(slice_dim, 0, 1).expand(*edge)
        last = ordered.narrow(slice_dim, self.n_slices - 1, 1).expand(*edge)
        self.slices = torch.cat([first, ordered, last], dim=slice_dim).contiguous() if context else ordered.contiguous()

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        n, c, k = stop - start, self.channels, self.context
        h, w = self.plane
        cin = c * (2 * k + 1)
        base = self.slices
        if self.channels_last:
            s_padded = base.shape[2]
            view = base.as_strided((n, h, w, cin), (c, w * s_padded * c, s_padded * c, 1), base.storage_offset() + start * c)
            return view.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)  # (N, Cin, H, W), NHWC memory
        view = base.as_strided((n, cin, h, w), (c * h * w, h * w, w, 1), base.storage_offset() + start * c * h * w)
        return view.contiguous()


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
) -> torch.Tensor:
    """Probabilities of every voxel of ``image`` from 2.5D sliding-window prediction.

    ``models``: networks ``(B, C * (2 * context + 1), H, W) -> (B, K, H, W)`` logits (all with
    the same K; their probabilities are averaged). ``image``: (C, R, A, S) float32 (a MetaTensor
    is fine; its meta is not used). ``axis``: spatial slicing axis as an index of ``image``
    (-1 = S = axial slices, 1 = R = sagittal, 2 = A = coronal). ``cfg``: window, overlap,
    batch, precision, TTA. ``device``: where the models run (``None`` = CUDA if available).
    ``progress``: called with the number of slices done after each batch (on a GPU: queued).

    Returns a CPU float32 tensor: (R, A, S) foreground probability when K == 1, else
    (K, R, A, S) class probabilities (softmax over K); stored slice-major, so it is a strided
    view unless the slicing axis comes first (call ``.contiguous()`` if that matters). Models run in eval mode (their
    train/eval state is restored afterwards, so a trainer can call this for validation); a
    model whose weights are not on ``device`` is moved there. For repeated calls, run
    ``prepare_models`` once (channels_last weights).
    """
    dev = resolve_device(device)
    amp = autocast_dtype(cfg.precision, dev)
    was_training = [m.training for m in models]
    for model in models:
        model.eval()
        if any(p.device != dev for p in model.parameters()):
            model.to(dev)
    network = EnsembleProbability(models, cfg.tta_flips if cfg.tta else (), amp, cfg.channels_last)
    try:
        return _predict(network, image, context, cfg, dev, axis, progress)
    finally:
        for model, training in zip(models, was_training, strict=True):
            model.train(training)


def _predict(
    network: EnsembleProbability,
    image: torch.Tensor,
    context: int,
    cfg: InferenceConfig,
    dev: torch.device,
    axis: int,
    progress: Callable[[int], None] | None,
) -> torch.Tensor:
    """``predict_volume``'s body: batches of 2.5D stacks through the inferer into one output."""
    volume = image.as_tensor() if hasattr(image, "as_tensor") else image  # MetaTensor ops are slow
    if volume.ndim != 4:
        raise ValueError(f"image must be (C, R, A, S), got shape {tuple(volume.shape)}")
    spatial_axis = axis % 4
    if spatial_axis == 0:
        raise ValueError("axis must name a spatial axis of (C, R, A, S): 1, 2, 3 or -1")
    n_slices = volume.shape[spatial_axis]
    plane = [s for i, s in enumerate(volume.shape[1:], start=1) if i != spatial_axis]
    batch = cfg.batch_size or default_batch_size(dev)
    roi = effective_roi(cfg.roi_size, plane)
    # one window covering the slice: blending weights are constant, so the inferer's padding,
    # importance map and weighted accumulation are pure overhead (predict of a BraTS case on
    # the CPU: 2.06 s -> 1.76 s); the network then runs on the whole slices -- same probabilities
    predict: Callable[[torch.Tensor], torch.Tensor] = network
    if tuple(roi) != tuple(plane):
        inferer = SlidingWindowInferer(
            roi_size=roi,
            sw_batch_size=batch,
            overlap=cfg.overlap,
            mode=cfg.blend,
            sw_device=dev,
            device=dev,
            cache_roi_weight_map=True,
        )
        predict = partial(inferer, network=network)

    # on a GPU the volume goes over once and the stacks and the output stay there: no host work
    # and no synchronising copy per batch (the CPU queues the batches while the GPU runs them)
    stacks = SliceStacks(volume.to(dev), spatial_axis, context, cfg.channels_last)
    out: torch.Tensor | None = None  # (K, n_slices, H, W) on ``dev``, filled batch by batch
    for start in range(0, n_slices, batch):
        stop = min(start + batch, n_slices)
        prob = predict(stacks(start, stop))  # (N, Cin, H, W) -> (N, K, H, W)
        if out is None:
            out = torch.empty((prob.shape[1], n_slices, *plane), dtype=torch.float32, device=dev)
        out[:, start:stop] = prob.transpose(0, 1)
        if progress is not None:
            progress(stop)
    assert out is not None
    del stacks
    out = torch.movedim(out.cpu(), 1, spatial_axis)  # back to the axis order of ``image`` (a strided view)
    return out[0] if out.shape[0] == 1 else out
