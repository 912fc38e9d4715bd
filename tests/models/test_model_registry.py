"""Registry and ModelConfig: names, unknown names/keys, settings an architecture cannot honour."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from medseg.config import Config, ModelConfig, load_config
from medseg.errors import ConfigError
from medseg.models import ARCHITECTURES, ENCODERS, build_model, list_encoders, list_models
from medseg.models.blocks import InceptionBlock
from medseg.models.registry import split_options


def test_registry_lists_every_pair():
    assert {"unet", "unet_inception", "deeplabv3plus"} <= set(ARCHITECTURES)
    assert {"unet", "resnet18", "resnet34", "resnet50", "xception"} <= set(ENCODERS)
    assert list_encoders() == list(ENCODERS)
    assert list_models() == [(a, e) for a in ARCHITECTURES for e in ENCODERS if a != "segnet" or e == "unet"]
    for arch, encoder in list_models():
        ModelConfig(arch=arch, encoder=encoder)  # every listed pair validates


def test_default_model_section():
    cfg = Config().model
    assert (cfg.arch, cfg.encoder, cfg.in_channels, cfg.out_channels) == ("unet_inception", "resnet34", 3, 1)


@pytest.mark.parametrize("field,valid", [("arch", ARCHITECTURES), ("encoder", ENCODERS)])
def test_unknown_name_lists_valid_names(field, valid):
    with pytest.raises(ValidationError) as info:
        ModelConfig(**{field: "unet_incepton"})
    message = str(info.value)
    assert f"unknown {field} 'unet_incepton'" in message
    assert all(name in message for name in valid)


def test_unknown_name_in_config_file_names_file_field_and_valid_names(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  arch: unet\n  encoder: resnet99\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "model.encoder" in message
    assert all(name in message for name in ENCODERS)


def test_unknown_key_fails(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  arch: unet\n  base_chanels: 32\n")
    with pytest.raises(ConfigError, match=r"model\.base_chanels: unknown key"):
        load_config(path)


def test_override_builds_the_named_model():
    cfg = load_config(None, ["model.arch=deeplabv3plus", "model.encoder=resnet18", "model.in_channels=9"])
    assert (cfg.model.arch, cfg.model.encoder, cfg.model.in_channels) == ("deeplabv3plus", "resnet18", 9)


def test_build_model_rejects_unknown_names_without_validation():
    cfg = ModelConfig.model_construct(arch="segformer", encoder="resnet34", in_channels=3, out_channels=1)
    with pytest.raises(ConfigError, match="unknown model.arch 'segformer'; valid: unet, unet_inception"):
        build_model(cfg)
    cfg = ModelConfig.model_construct(arch="unet", encoder="vit", in_channels=3, out_channels=1)
    with pytest.raises(ConfigError, match="unknown model.encoder 'vit'; valid: unet, resnet18"):
        build_model(cfg)


@pytest.mark.parametrize(
    "arch,encoder,setting",
    [
        ("unet", "resnet34", {"output_stride": 8}),
        ("unet_inception", "unet", {"aspp_rates": [6, 12, 18]}),
        ("unet", "unet", {"inception_branches": [0.25, 0.25, 0.25, 0.25]}),
        ("deeplabv3plus", "resnet34", {"residual": True}),
        ("deeplabv3plus", "xception", {"decoder_channels": [256]}),
    ],
)
def test_setting_the_model_cannot_honour_is_an_error(arch, encoder, setting):
    (key,) = setting
    with pytest.raises(ValidationError, match=rf"model\.{key} not supported by arch '{arch}'"):
        ModelConfig(arch=arch, encoder=encoder, **setting)


def test_none_settings_are_dropped():
    cfg = ModelConfig(
        arch="deeplabv3plus", encoder="resnet18", residual=None, decoder_channels=None, width=0.125
    )
    enc_kwargs, arch_kwargs = split_options(cfg)
    assert enc_kwargs == {"width": 0.125} and arch_kwargs == {"width": 0.125}
    build_model(cfg)


def test_residual_reaches_plain_encoder_and_decoder():
    cfg = ModelConfig(arch="deeplabv3plus", encoder="unet", residual=True, width=0.125)
    assert split_options(cfg)[0]["residual"] is True  # the plain encoder takes it, DeepLab does not
    model = build_model(ModelConfig(arch="unet", encoder="unet", residual=True, width=0.125))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "ResidualUnit" in kinds
    assert all("ResidualUnit" in {type(m).__name__ for m in b.conv.modules()} for b in model.decoder.blocks)


def test_instance_norm_replaces_every_batch_norm():
    model = build_model(ModelConfig(arch="unet_inception", encoder="resnet18", norm="instance", width=0.125))
    kinds = {type(m).__name__ for m in model.modules()}
    assert "InstanceNorm2d" in kinds and "BatchNorm2d" not in kinds


def test_inception_branches_are_configurable():
    model = build_model(
        ModelConfig(
            arch="unet_inception", encoder="unet", width=0.25, inception_branches=[0.5, 0.25, 0.125, 0.125]
        )
    )
    block = model.decoder.blocks[-1].skip_block  # the stride-1 skip: 64 * 0.25 channels
    assert isinstance(block, InceptionBlock) and block.channels == 16
    assert [block.b1.conv.out_channels, block.b3[1].conv.out_channels, block.b5[2].conv.out_channels] == [
        8,
        4,
        2,
    ]


def test_bad_setting_values_fail():
    with pytest.raises(ValidationError):
        ModelConfig(inception_branches=[0.5, 0.5])
    with pytest.raises(ValidationError):
        ModelConfig(arch="deeplabv3plus", output_stride=32)
    with pytest.raises(ValidationError, match="local file path"):
        ModelConfig(pretrained_path="https://example.org/resnet34.pth")
    cfg = ModelConfig(arch="unet", encoder="resnet18", decoder_channels=[64, 32], width=0.125)
    with pytest.raises(ConfigError, match="decoder_channels needs 5 values"):
        build_model(cfg)


def test_decoder_channels_are_used():
    cfg = ModelConfig(arch="unet", encoder="resnet18", decoder_channels=[40, 30, 20, 10, 5], width=0.125)
    model = build_model(cfg)
    assert [b.up.out_channels for b in model.decoder.blocks] == [40, 30, 20, 10, 5]
    assert model.head.in_channels == 5


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_names_table_matches_the_architecture_builders(arch):
    """medseg.model_names (what configs are validated against, without torch) = the registry."""
    import inspect

    from medseg.model_names import ARCHITECTURE_OPTIONS, OPTION_FIELDS

    assert ARCHITECTURE_OPTIONS[arch] == set(inspect.signature(ARCHITECTURES[arch]).parameters) & set(OPTION_FIELDS)


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_names_table_matches_the_encoder_builders(encoder):
    import inspect

    from medseg.model_names import ENCODER_OPTIONS, OPTION_FIELDS

    assert ENCODER_OPTIONS[encoder] == set(inspect.signature(ENCODERS[encoder]).parameters) & set(OPTION_FIELDS)
