"""DeepLabv3+: documented feature-map sizes at output stride 16 and 8, atrous rates, dilation."""

from __future__ import annotations

import pytest
import torch

from medseg.config import ModelConfig
from medseg.models import build_model


def _shapes(model, x):
    """Spatial sizes seen by the ASPP, the low-level projection, the decoder output and the logits."""
    seen = {}
    dec = model.decoder
    hooks = [
        dec.aspp.register_forward_hook(
            lambda m, a, out: seen.update(aspp_in=a[0].shape[-2:], aspp_out=out.shape[-2:])
        ),
        dec.reduce.register_forward_hook(lambda m, a, out: seen.update(low=a[0].shape[-2:])),
        dec.register_forward_hook(lambda m, a, out: seen.update(decoder=out.shape[-2:])),
    ]
    with torch.no_grad():
        seen["logits"] = model(x).shape[-2:]
    for h in hooks:
        h.remove()
    return {k: tuple(v) for k, v in seen.items()}


@pytest.mark.parametrize("encoder", ["resnet18", "resnet50", "xception", "unet"])
@pytest.mark.parametrize("output_stride", [16, 8])
def test_feature_map_sizes(encoder, output_stride):
    model = build_model(
        ModelConfig(arch="deeplabv3plus", encoder=encoder, output_stride=output_stride, width=0.125)
    ).eval()
    assert max(model.encoder.strides) == output_stride and model.encoder.output_stride == output_stride
    side = 256 // output_stride
    assert _shapes(model, torch.randn(1, 3, 256, 256)) == {
        "aspp_in": (side, side),
        "aspp_out": (side, side),
        "low": (64, 64),
        "decoder": (64, 64),
        "logits": (256, 256),
    }
    # non-multiple sizes are padded to the output stride and cropped back
    shapes = _shapes(model, torch.randn(1, 3, 250, 200))
    assert shapes["aspp_in"] == (-(-250 // output_stride), -(-200 // output_stride))
    assert shapes["logits"] == (250, 200)


def test_resnet_strides_become_dilation():
    model = build_model(ModelConfig(arch="deeplabv3plus", encoder="resnet34", output_stride=8, width=0.125))
    enc = model.encoder
    assert enc.strides == [2, 4, 8, 8, 8]
    layer3, layer4 = enc.stages[3], enc.stages[4]
    assert layer3[0].conv1.stride == (1, 1) and layer3[0].downsample[0].stride == (1, 1)
    assert {b.conv2.dilation for b in layer3} == {(2, 2)} and {b.conv2.dilation for b in layer4} == {(4, 4)}
    os16 = build_model(ModelConfig(arch="deeplabv3plus", encoder="resnet34", width=0.125)).encoder
    assert os16.strides == [2, 4, 8, 16, 16]
    assert {b.conv2.dilation for b in os16.stages[3]} == {(1, 1)}
    with pytest.raises(RuntimeError, match="already dilated"):
        enc.set_output_stride(16)


def _aspp_rates(model):
    return [branch[0].dilation[0] for branch in model.decoder.aspp.branches[1:4]]


def test_aspp_rates_default_double_at_os8_and_are_configurable():
    def build(**kw):
        return build_model(ModelConfig(arch="deeplabv3plus", encoder="xception", width=0.125, **kw))

    assert _aspp_rates(build()) == [6, 12, 18]
    assert _aspp_rates(build(output_stride=8)) == [12, 24, 36]
    assert _aspp_rates(build(output_stride=8, aspp_rates=[3, 6, 9])) == [3, 6, 9]


def test_aspp_channels_and_image_pooling_has_no_batch_norm():
    model = build_model(ModelConfig(arch="deeplabv3plus", encoder="resnet18", aspp_channels=40, width=0.125))
    aspp = model.decoder.aspp
    assert aspp.project[0].conv.out_channels == 40 and model.head.in_channels == 40
    pooling = aspp.branches[4]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in pooling.modules())
