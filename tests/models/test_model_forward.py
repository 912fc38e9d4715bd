"""Every registered (architecture, encoder) pair: forward + backward on 1/3/9-channel inputs.

Parametrised from ``list_models()``, so a new registration is tested automatically (instance
models, whose training pass is a loss, are tested the same way in ``test_instance_models_train``). Models are
built at ``width=0.125`` (every channel count / 8) to keep the suite fast on a CPU; the
structure (depth, strides, padding, skip wiring) is the same as at full width.
"""

from __future__ import annotations

import pytest
import torch

from medseg.config import ModelConfig
from medseg.model_names import is_instance_arch
from medseg.models import build_model, list_models
from medseg.models.detection.maskrcnn import instance_targets

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


DENSE = [(a, e) for a, e in list_models() if not is_instance_arch(a)]
INSTANCE = [(a, e) for a, e in list_models() if is_instance_arch(a)]


@pytest.mark.parametrize("channels,height,width", CASES, ids=[f"c{c}-{h}x{w}" for c, h, w in CASES])
@pytest.mark.parametrize("arch,encoder", DENSE, ids=[f"{a}-{e}" for a, e in DENSE])
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


@pytest.mark.parametrize("arch,encoder", INSTANCE, ids=[f"{a}-{e}" for a, e in INSTANCE])
def test_instance_models_train(arch, encoder):
    """The training pass (instances given) returns finite loss terms whose sum reaches every
    parameter; the dense view (no instances) is (B, 1, H, W) logits on a non-square slice."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, encoder=encoder, in_channels=3, out_channels=1, width=WIDTH)).train()
    label = torch.zeros(2, 1, 96, 80)
    label[0, 0, 20:40, 10:30] = 1
    label[0, 0, 20:40, 30:44] = 2  # touching the first
    label[1, 0, 60:80, 50:70] = 4
    x = torch.randn(2, 3, 96, 80) + 2 * (label > 0)
    losses = model(x, instance_targets(label))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient reached {name}"
    assert model.eval()(x).shape == (2, 1, 96, 80)
