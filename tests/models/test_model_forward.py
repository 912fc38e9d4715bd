"""Every registered (architecture, encoder) pair: forward + backward on 1/3/9-channel inputs.

Parametrised from ``list_models()``, so a new registration is tested automatically. Models are
built at ``width=0.125`` (every channel count / 8) to keep the suite fast on a CPU; the
structure (depth, strides, padding, skip wiring) is the same as at full width.
"""

from __future__ import annotations

import pytest
import torch

from medseg.config import ModelConfig
from medseg.models import build_model, list_models

WIDTH = 0.125
# (in_channels, height, width): every channel count at 240x240, the non-square size at 3 channels
CASES = [(1, 240, 240), (3, 240, 240), (9, 240, 240), (3, 256, 200)]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared CPU, OpenMP barriers across busy cores cost far more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("channels,height,width", CASES, ids=[f"c{c}-{h}x{w}" for c, h, w in CASES])
@pytest.mark.parametrize("arch,encoder", list_models(), ids=[f"{a}-{e}" for a, e in list_models()])
def test_forward_backward(arch, encoder, channels, height, width):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, encoder=encoder, in_channels=channels, out_channels=2, width=WIDTH)
    model = build_model(cfg).train()
    x = torch.randn(2, channels, height, width)
    y = model(x)
    assert y.shape == (2, 2, height, width)
    assert torch.isfinite(y).all()
    assert y.std() > 0
    (y * torch.randn_like(y)).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient reached {name}"
        assert torch.isfinite(param.grad).all(), f"non-finite gradient in {name}"
    for key in model.encoder.input_conv_keys:
        first = model.encoder.get_parameter(key.removesuffix(".weight") + ".weight")
        assert first.shape[1] == channels
        assert first.grad.abs().sum() > 0, f"zero gradient at the first layer {key}"
