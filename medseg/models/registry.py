"""Model registry: plain dicts of architectures and encoders, ``build_model(cfg)``, ``list_models()``.

A built-in architecture builder is ``build(encoder, out_channels, **options) -> nn.Module``; an
encoder builder is ``build(in_channels, **options) -> Encoder``; a plug-in architecture builder
gets keywords: ``in_channels``, ``out_channels``, the built ``encoder`` only when its signature
names one, and ``model.options`` (:func:`build_plugin_arch`). ``build_model`` passes each optional
``ModelConfig`` setting that is not None to every builder whose signature names it (timm's
habit: None means "the model's default"). A setting that neither the architecture nor the
encoder accepts is an error, never silently ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from medseg.errors import ConfigError
from medseg.model_names import (
    ARCHITECTURE_ENCODERS,
    ARCHITECTURE_OPTIONS,
    ENCODER_OPTIONS,
    OPTION_FIELDS,
    is_monai_arch,
    model_name,
    monai_network_name,
    plugin_entry_points,
    unsupported_options,
)
from medseg.models.deeplab import build_deeplabv3plus
from medseg.models.detection.maskrcnn import build_maskrcnn
from medseg.models.encoders import (
    Encoder,
    resnet18_encoder,
    resnet34_encoder,
    resnet50_encoder,
    unet_encoder,
    xception_encoder,
)
from medseg.models.segnet import build_segnet
from medseg.models.unet import build_unet, build_unet_inception

if TYPE_CHECKING:
    from medseg.config import ModelConfig

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "unet": build_unet,
    "unet_inception": build_unet_inception,
    "deeplabv3plus": build_deeplabv3plus,
    "segnet": build_segnet,
    "maskrcnn": build_maskrcnn,
}

ENCODERS: dict[str, Callable[..., Encoder]] = {
    "unet": unet_encoder,
    "resnet18": resnet18_encoder,
    "resnet34": resnet34_encoder,
    "resnet50": resnet50_encoder,
    "xception": xception_encoder,
}



def _check_names_table() -> None:
    """The torch-free table of ``medseg.model_names`` must describe these dicts exactly."""
    for kind, registry, table in (("arch", ARCHITECTURES, ARCHITECTURE_OPTIONS), ("encoder", ENCODERS, ENCODER_OPTIONS)):
        if list(registry) != list(table):
            raise RuntimeError(f"model.{kind} names differ between models/registry.py {list(registry)} and "
                               f"model_names.py {list(table)}")  # fmt: skip
        for name, builder in registry.items():
            accepted = _accepted(builder) & set(OPTION_FIELDS)
            if accepted != table[name]:
                raise RuntimeError(f"model.{kind} {name!r}: its builder takes {sorted(accepted)}, model_names.py "
                                   f"lists {sorted(table[name])}")  # fmt: skip


def _lookup(registry: dict[str, Any], kind: str, name: str) -> Any:
    """The builder of ``name``: built-in, else a plug-in (:mod:`medseg.models.plugins`)."""
    if name in registry:
        return registry[name]
    if name in plugin_entry_points()[kind]:
        from medseg.models.plugins import load_plugin

        return load_plugin(kind, name)
    valid = list(registry) + [n for n in plugin_entry_points()[kind] if n not in registry]
    raise ConfigError(f"unknown model.{kind} {name!r}; valid: {', '.join(valid)}")


def _accepted(builder: Callable[..., Any]) -> set[str]:
    return set(inspect.signature(builder).parameters)


def list_encoders() -> list[str]:
    """Names of every registered encoder."""
    return list(ENCODERS)


def list_models() -> list[tuple[str, str]]:
    """Every built-in ``(architecture, encoder)`` pair that ``build_model`` can build."""
    return [(arch, enc) for arch in ARCHITECTURES for enc in ENCODERS
            if enc in ARCHITECTURE_ENCODERS.get(arch, ENCODERS)]


def list_monai_networks() -> list[str]:
    """``monai:<Name>`` of every listed MONAI 2-D network (:data:`medseg.model_names.MONAI_NETWORKS`)."""
    from medseg.model_names import MONAI_NETWORKS, MONAI_PREFIX

    return [MONAI_PREFIX + name for name in MONAI_NETWORKS]


def split_options(cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``cfg``'s non-None options split into ``(encoder_kwargs, arch_kwargs)`` for a built-in
    architecture; a plug-in encoder under it takes ``model.options`` (a plug-in architecture
    takes them itself: :func:`build_plugin_arch`).

    Raises ``ConfigError`` for an unknown name or a setting that neither builder accepts.
    """
    options = {k: getattr(cfg, k) for k in OPTION_FIELDS if getattr(cfg, k) is not None}
    problem = unsupported_options(cfg.arch, cfg.encoder, options)
    if problem is not None:
        raise ConfigError(problem)
    enc_kwargs = {k: v for k, v in options.items() if k in ENCODER_OPTIONS.get(cfg.encoder, ())}
    arch_kwargs = {k: v for k, v in options.items() if k in ARCHITECTURE_OPTIONS.get(cfg.arch, ())}
    if cfg.arch in ARCHITECTURES and cfg.encoder not in ENCODERS:
        enc_kwargs.update(cfg.options or {})
    return enc_kwargs, arch_kwargs


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build ``cfg.arch`` on ``cfg.encoder``: ``(B, in_channels, H, W) -> (B, out_channels, H, W)`` logits.

    ``monai:<Name>``: the MONAI network (:mod:`medseg.models.monai_nets`). Loads
    ``cfg.pretrained`` (a local file of encoder weights, :mod:`medseg.models.pretrained`) into
    the encoder, adapting the input conv to ``in_channels``.
    """
    if is_monai_arch(cfg.arch):
        return _build_monai(cfg)
    arch_builder = _lookup(ARCHITECTURES, "arch", cfg.arch)
    if cfg.arch not in ARCHITECTURES:
        return build_plugin_arch(arch_builder, cfg)
    enc_kwargs, arch_kwargs = split_options(cfg)
    try:
        return arch_builder(_build_encoder(cfg, enc_kwargs), out_channels=cfg.out_channels, **arch_kwargs)
    except (ValueError, TypeError) as exc:  # a value a builder rejects (e.g. decoder_channels of the wrong length)
        raise ConfigError(f"model ({model_name(cfg.arch, cfg.encoder)}): {exc}") from exc


def _build_encoder(cfg: ModelConfig, kwargs: dict[str, Any]) -> Encoder:
    """``cfg.encoder`` on ``cfg.in_channels`` inputs, with ``cfg.pretrained`` loaded into it."""
    encoder = _lookup(ENCODERS, "encoder", cfg.encoder)(in_channels=cfg.in_channels, **kwargs)
    if cfg.pretrained is not None:
        from medseg.models.pretrained import load_pretrained

        load_pretrained(encoder, cfg.pretrained, cfg.pretrained_map, cfg.pretrained_strict)
    return encoder


# keywords medseg passes to a plug-in architecture builder itself (never from model.options)
PLUGIN_ARCH_ARGUMENTS = ("in_channels", "out_channels", "encoder")


def build_plugin_arch(builder: Callable[..., Any], cfg: ModelConfig) -> nn.Module:
    """A plug-in architecture: ``builder(in_channels=..., out_channels=..., [encoder=...],
    **model.options)``, all keywords. ``in_channels`` (modalities x context slices) is passed
    when the signature names it or takes ``**kwargs``; the ``model.encoder`` module (built on
    ``in_channels``, ``model.pretrained`` loaded) only when it names ``encoder``, so a builder
    that makes its own network costs no unused encoder (and its name shows none). Raises
    ``ConfigError`` for ``model.options`` that repeat these keywords or that the builder rejects."""
    options = dict(cfg.options or {})
    clash = sorted(k for k in options if k in PLUGIN_ARCH_ARGUMENTS)
    if clash:
        raise ConfigError(f"model.options.{', model.options.'.join(clash)}: set by medseg for plug-in arch {cfg.arch!r} "
                          "(use model.in_channels / model.out_channels / model.encoder)")
    params = inspect.signature(builder).parameters
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {"out_channels": cfg.out_channels, **options}
    if "in_channels" in params or any_keyword:
        kwargs["in_channels"] = cfg.in_channels
    name = model_name(cfg.arch, cfg.encoder)
    try:
        if "encoder" in params:
            kwargs["encoder"] = _build_encoder(cfg, {})
        return builder(**kwargs)
    except (ValueError, TypeError) as exc:  # an option the builder does not take, a value it rejects
        raise ConfigError(f"model ({name}): {exc}") from exc


def _build_monai(cfg: ModelConfig) -> nn.Module:
    from medseg.models.monai_nets import build_monai_network

    name = monai_network_name(cfg.arch)
    model = build_monai_network(name, cfg.in_channels, cfg.out_channels, cfg.options)
    if cfg.pretrained is not None:
        if name != "FlexibleUNet":
            raise ConfigError(f"model.pretrained with {cfg.arch}: only monai:FlexibleUNet has an encoder to load "
                              "weights into")
        from medseg.models.pretrained import load_pretrained

        encoder = model.net.encoder
        first = "_conv_stem.weight" if "_conv_stem.weight" in encoder.state_dict() else "conv1.weight"
        load_pretrained(encoder, cfg.pretrained, cfg.pretrained_map, cfg.pretrained_strict, [first], cfg.in_channels,
                        medseg_layout=False)
    return model


_check_names_table()
