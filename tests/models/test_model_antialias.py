"""Anti-aliased downsampling (``model.antialias``): every registered model, shapes, keys, aliasing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.config import ModelConfig
from medseg.models import build_model, list_models
from medseg.models.antialias import BlurConv2d, MaxBlurPool2d, antialias_downsampling


def _strided(model: nn.Module) -> list[nn.Module]:
    """Plain (not anti-aliased) stride-2 convs and max-pools."""
    out = []
    for m in model.modules():
        if isinstance(m, (BlurConv2d, MaxBlurPool2d)):
            continue
        if isinstance(m, nn.Conv2d) and tuple(m.stride) == (2, 2):
            out.append(m)
        if isinstance(m, nn.MaxPool2d) and m.stride in (2, (2, 2)):
            out.append(m)
    return out


@pytest.mark.parametrize("arch,encoder", list_models(), ids=[f"{a}-{e}" for a, e in list_models()])
def test_every_model_can_be_antialiased_with_the_same_shapes_and_keys(arch, encoder):
    settings = {"arch": arch, "encoder": encoder, "in_channels": 3, "width": 0.125}
    torch.manual_seed(0)
    plain = build_model(ModelConfig(**settings)).eval()
    smooth = build_model(ModelConfig(**settings, antialias=True)).eval()
    assert _strided(plain) and not _strided(smooth)  # every subsampling layer was replaced
    assert plain.state_dict().keys() == smooth.state_dict().keys()
    smooth.load_state_dict(plain.state_dict())  # same parameters: a plain checkpoint loads
    x = torch.randn(1, 3, 70, 45)
    with torch.no_grad():
        a, b = plain(x), smooth(x)
    assert a.shape == b.shape == (1, 1, 70, 45)
    assert not torch.allclose(a, b)  # the blur changes what the network computes


def test_blur_before_a_strided_conv_removes_aliasing():
    """A stride-2 1x1 identity conv on stripes at the Nyquist frequency sees all ones or all
    zeros depending on a 1-pixel shift; after the blur both shifts give the same output."""
    conv = nn.Conv2d(1, 1, 1, stride=2, bias=False)
    nn.init.ones_(conv.weight)
    stripes = (torch.arange(32) % 2 == 0).float().expand(1, 1, 32, 32).clone()
    shifted = torch.roll(stripes, 1, dims=-1)
    with torch.no_grad():
        plain = conv(stripes)[..., 2:-2], conv(shifted)[..., 2:-2]
        assert torch.equal(plain[0], torch.ones_like(plain[0])) and torch.equal(plain[1], torch.zeros_like(plain[1]))
        antialias_downsampling(wrapper := nn.Sequential(conv))
        assert isinstance(wrapper[0], BlurConv2d)
        smooth = wrapper(stripes)[..., 2:-2], wrapper(shifted)[..., 2:-2]
    torch.testing.assert_close(smooth[0], torch.full_like(smooth[0], 0.5))
    torch.testing.assert_close(smooth[1], smooth[0])


@pytest.mark.parametrize("kernel,padding", [(2, 0), (3, 1)])
@pytest.mark.parametrize("size", [32, 33, 7])
def test_max_blur_pool_keeps_the_max_pool_output_size(kernel, padding, size):
    x = torch.randn(2, 4, size, size + 1)
    assert MaxBlurPool2d(kernel, 2, padding)(x).shape == nn.MaxPool2d(kernel, 2, padding)(x).shape


def test_max_blur_pool_of_a_constant_is_the_constant():
    x = torch.full((1, 2, 16, 16), 3.0)
    torch.testing.assert_close(MaxBlurPool2d(2, 2)(x), torch.full((1, 2, 8, 8), 3.0))


def test_dilated_deeplab_stages_are_left_alone():
    """DeepLab's output stride 16 turns the last stage's stride into dilation: only the layers
    that still subsample are anti-aliased."""
    model = build_model(ModelConfig(arch="deeplabv3plus", encoder="resnet18", in_channels=3, width=0.125, antialias=True))
    blurred = [m for m in model.modules() if isinstance(m, (BlurConv2d, MaxBlurPool2d))]
    # stem conv, stem max-pool, layer2 and layer3 (3x3 conv + 1x1 shortcut each); layer4 is dilated
    assert len(blurred) == 6


def test_checkpoint_rebuilds_the_antialiased_model(tmp_path):
    from medseg.models.checkpoint import model_from_checkpoint, save_checkpoint

    cfg = ModelConfig(arch="unet", encoder="unet", in_channels=2, width=0.125, antialias=True)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    path = save_checkpoint(tmp_path / "aa.pt", model, cfg, {})
    loaded, loaded_cfg = model_from_checkpoint(path)
    assert loaded_cfg.antialias and not _strided(loaded)
    x = torch.randn(1, 2, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))
