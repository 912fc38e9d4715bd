"""predict_volume: 2.5D stacks, windows, TTA, ensembles, precision, axes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from infer_helpers import ChannelThreshold
from torch import nn

from medseg.config import InferenceConfig, ModelConfig
from medseg.inference import predict_volume
from medseg.inference.predictor import effective_roi
from medseg.models import build_model
from medseg.runtime import autocast_dtype, cpu_has_fast_bf16


def _binary_volume(shape=(2, 23, 19, 11), seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.random(shape) > 0.6).astype(np.float32))


@pytest.mark.parametrize("axis", [1, 2, 3, -1])
@pytest.mark.parametrize("context", [0, 2])
def test_identity_model_reproduces_the_centre_slice_on_every_axis(axis, context):
    volume = _binary_volume()
    channel = 1
    model = ChannelThreshold(context * 2 + channel, 0.5)  # centre slice, second modality
    prob = predict_volume([model], volume, context, InferenceConfig(batch_size=3), "cpu", axis=axis)
    assert prob.shape == volume.shape[1:] and prob.dtype == torch.float32
    np.testing.assert_array_equal((prob >= 0.5).numpy(), volume[channel].numpy() > 0.5)


def test_neighbour_channels_are_offset_major_with_replicated_edges():
    volume = _binary_volume(shape=(2, 9, 8, 7), seed=1)
    # context 1, 2 modalities: channels [z-1: m0, m1, z: m0, m1, z+1: m0, m1]; pick z-1 of m1
    prob = predict_volume([ChannelThreshold(1, 0.5)], volume, 1, InferenceConfig(), "cpu")
    expected = torch.cat([volume[1, :, :, :1], volume[1, :, :, :-1]], dim=-1) > 0.5  # slice z sees z-1 (z=0 sees itself)
    np.testing.assert_array_equal((prob >= 0.5).numpy(), expected.numpy())


def test_tiled_windows_tta_and_ensemble_keep_the_identity():
    volume = _binary_volume(shape=(1, 70, 45, 6), seed=2)
    cfg = InferenceConfig(roi_size=(32, 24), overlap=0.5, blend="gaussian", tta=True, batch_size=2)
    assert effective_roi(cfg.roi_size, (70, 45)) == (32, 24) and effective_roi((512, 512), (70, 45)) == (70, 45)
    prob = predict_volume([ChannelThreshold(1, 0.5), ChannelThreshold(1, 0.5, gain=20.0)], volume, 1, cfg, "cpu")
    np.testing.assert_array_equal((prob >= 0.5).numpy(), volume[0].numpy() > 0.5)
    assert float(prob[volume[0] > 0.5].min()) > 0.99 and float(prob[volume[0] < 0.5].max()) < 0.01


def test_ensemble_averages_probabilities():
    volume = torch.zeros(1, 6, 5, 4)
    cfg = InferenceConfig(precision="fp32")
    low, high = ChannelThreshold(1, 0.0, gain=0.0), ChannelThreshold(1, -1.0, gain=1.0)  # sigmoid(0), sigmoid(1)
    prob = predict_volume([low, high], volume, 1, cfg, "cpu")
    np.testing.assert_allclose(prob.numpy(), (0.5 + 1 / (1 + np.exp(-1.0))) / 2, rtol=1e-6)


class _MarksFirstRow(nn.Module):
    """Identity plus a lesion on the first row of every window: not flip-equivariant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = 40 * (x[:, :1] - 0.5)
        logits[:, :, 0, :] = 40.0
        return logits


def test_tta_flips_back_before_averaging():
    volume = torch.zeros(1, 8, 6, 3)
    volume[0, 1, 2, :] = 1
    prob = predict_volume([_MarksFirstRow()], volume, 0, InferenceConfig(tta=True, tta_flips=[[0]]), "cpu")
    # plain pass: rows 0 and 1; flipped pass, flipped back: rows 7 and 1. Each pass weighs half.
    np.testing.assert_allclose(prob[1, 2].numpy(), 1.0, atol=1e-4)
    np.testing.assert_allclose(prob[0].numpy(), 0.5, atol=1e-4)
    np.testing.assert_allclose(prob[7].numpy(), 0.5, atol=1e-4)
    np.testing.assert_allclose(prob[2:7].numpy(), 0.0, atol=1e-4)


def test_multiclass_returns_softmax_probabilities_per_class():
    model = build_model(ModelConfig(arch="unet", encoder="unet", in_channels=3, out_channels=3, width=0.125))
    volume = torch.randn(1, 20, 18, 5)
    prob = predict_volume([model], volume, 1, InferenceConfig(precision="fp32"), "cpu")
    assert prob.shape == (3, 20, 18, 5)
    torch.testing.assert_close(prob.sum(0), torch.ones(20, 18, 5))


def test_bf16_batching_and_train_state():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="unet", encoder="unet", in_channels=6, width=0.125))
    model.train()
    volume = torch.randn(2, 33, 29, 9)
    reference = predict_volume([model], volume, 1, InferenceConfig(precision="fp32", batch_size=1), "cpu")
    assert model.training  # a trainer calling predict_volume for validation keeps its mode
    batched = predict_volume([model], volume, 1, InferenceConfig(precision="fp32", batch_size=7), "cpu")
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=1e-4)
    bf16 = predict_volume([model], volume, 1, InferenceConfig(precision="bf16", channels_last=True), "cpu")
    assert float((bf16 - reference).abs().max()) < 0.05


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("fp16", cpu) is torch.float16
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if cpu_has_fast_bf16() else None)
    assert autocast_dtype("off", cpu) is None  # train.amp spells fp32 "off"


def test_bad_axis_is_refused():
    with pytest.raises(ValueError, match="spatial axis"):
        predict_volume([ChannelThreshold(0, 0.5)], torch.zeros(1, 4, 4, 4), 0, InferenceConfig(), "cpu", axis=0)


@pytest.mark.parametrize("padding", [((0, 0), (0, 0)), ((2, 1), (0, 3))])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("axis", [1, 2, 3])
def test_slice_stacks_match_context_stack(channels_last, axis, padding):
    import torch.nn.functional as F

    from medseg.inference.predictor import SliceStacks
    from medseg.transforms.preprocessing import context_stack

    volume = torch.randn(3, 7, 6, 5)
    stacks = SliceStacks(volume, axis, 2, channels_last, padding)
    n = volume.shape[axis]
    got = stacks(1, n)
    (top, bottom), (left, right) = padding
    expected = F.pad(context_stack(volume, list(range(1, n)), 2, axis=axis), [left, right, top, bottom], mode="replicate")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_whole_slice_window_skips_the_inferer_with_the_same_probabilities():
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    from medseg.inference.predictor import window_padding
    from medseg.transforms.preprocessing import context_stack

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="unet", encoder="resnet18", in_channels=6, width=0.125)).eval()
    volume = torch.randn(2, 40, 37, 5)
    cfg = InferenceConfig(precision="fp32", batch_size=2, blend="gaussian", overlap=0.5)
    prob = predict_volume([model], volume, 1, cfg, "cpu")  # roi 512 > slice: one window per slice
    (top, bottom), (left, right) = window_padding((40, 37), cfg.roi_size, model.multiple)
    assert (top, bottom, left, right) == (12, 12, 13, 14)  # 512-ROI centring: 236 and 237 px before, mod 32
    with torch.no_grad():
        x = F.pad(context_stack(volume, list(range(5)), 1), [left, right, top, bottom], mode="replicate")
        expected = sliding_window_inference(x, (64, 64), 2, model, overlap=0.5, mode="gaussian")
    expected = expected[:, 0, top : top + 40, left : left + 37]
    torch.testing.assert_close(prob, torch.sigmoid(expected).permute(1, 2, 0), atol=1e-5, rtol=0)


class _PoolingPhase(nn.Module):
    """Logits that depend only on each pixel's offset on an 8-pixel grid (its row and column
    mod 8 in the network's input): the most position-sensitive network of stride 8."""

    multiple = 8

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        rows = torch.arange(h, dtype=x.dtype).remainder(8)[:, None]
        cols = torch.arange(w, dtype=x.dtype).remainder(8)[None, :]
        return (self.weight * (rows - 3.5 + (cols - 3.5) / 8)).expand(x.shape[0], 1, h, w).clone()


@pytest.mark.parametrize(("plane", "roi"), [((20, 27), (64, 64)), ((13, 48), (32, 32)), ((45, 40), (32, 32))])
def test_slices_sit_on_the_pooling_grid_where_the_configured_window_puts_them(plane, roi):
    """medseg's window (the whole slice, padded to the stride) gives what MONAI's inferer with the
    configured ROI gives, even for a network whose output depends on the pooling phase alone."""
    from monai.inferers import sliding_window_inference

    volume = torch.randn(1, *plane, 3)
    cfg = InferenceConfig(roi_size=roi, overlap=0.5, blend="gaussian", precision="fp32")
    prob = predict_volume([_PoolingPhase()], volume, 0, cfg, "cpu")
    with torch.no_grad():
        x = volume[0].permute(2, 0, 1)[:, None]  # (S, 1, H, W)
        network = _PoolingPhase()
        expected = sliding_window_inference(x, roi, 4, lambda t: torch.sigmoid(network(t)), overlap=0.5, mode="gaussian",
                                            padding_mode="replicate")  # blended in probability space, as medseg does
    torch.testing.assert_close(prob, expected[:, 0].permute(1, 2, 0), atol=1e-6, rtol=0)


def test_window_padding_centres_smaller_slices_modulo_the_stride():
    from medseg.inference.predictor import window_padding

    assert window_padding((162, 191), (256, 256), 32) == ((15, 15), (0, 1))  # a BraTS slice: 192 x 192
    assert window_padding((447, 353), (256, 256), 32) == ((0, 0), (0, 0))  # tiled from pixel 0
    assert window_padding((200, 64), (256, 256), 1) == ((0, 0), (0, 0))
    for n in range(1, 256):
        (before, after), _ = window_padding((n, 300), (256, 256), 32)
        assert (before - (256 - n) // 2) % 32 == 0 and (before + n + after) % 32 == 0 and 0 <= after < 32


class ThreadRecorder(nn.Module):
    """(N, C, H, W) -> zeros (N, 1, H, W); records torch's intra-op thread count at each call."""

    multiple = 1

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add(torch.get_num_threads())
        return torch.zeros((x.shape[0], 1, *x.shape[2:]))


@pytest.mark.parametrize(("backend", "threads_inside"), [("torch", 2), ("auto", 2), ("onnxruntime", 1), ("openvino", 1)])
def test_compiled_backends_predict_with_one_torch_thread_and_restore_it(backend, threads_inside):
    """A compiled runtime brings its own thread pool; torch's spinning workers would take its
    cores between batches, so torch runs single-threaded around it and gets its count back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = ThreadRecorder()
        cfg = InferenceConfig(backend=backend, precision="fp32", cascade=False)
        predict_volume([model], torch.zeros(1, 16, 16, 6), 1, cfg, "cpu")
        assert model.seen == {threads_inside}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
