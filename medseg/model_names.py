"""The model registry's names and the settings each builder takes, without importing torch.

Configs are validated against this table (``medseg.config`` never imports the models);
``medseg.models.registry`` checks at import that its dicts and its builders' signatures match
it, so the two cannot drift apart. Adding a model: register its builder in
``medseg/models/registry.py`` and its name and settings here.
"""

from __future__ import annotations

# ModelConfig fields handed to the builders (the others are structural: names, channels, weights)
OPTION_FIELDS: tuple[str, ...] = (
    "width",
    "decoder_channels",
    "residual",
    "inception_branches",
    "output_stride",
    "aspp_rates",
    "aspp_channels",
    "dropout",
    "norm",
)

# architecture name -> the OPTION_FIELDS its builder accepts
ARCHITECTURE_OPTIONS: dict[str, frozenset[str]] = {
    "unet": frozenset({"decoder_channels", "dropout", "norm", "residual"}),
    "unet_inception": frozenset({"decoder_channels", "dropout", "inception_branches", "norm", "residual"}),
    "deeplabv3plus": frozenset({"aspp_channels", "aspp_rates", "dropout", "norm", "output_stride", "width"}),
}

# encoder name -> the OPTION_FIELDS its builder accepts
ENCODER_OPTIONS: dict[str, frozenset[str]] = {
    "unet": frozenset({"norm", "residual", "width"}),
    "resnet18": frozenset({"norm", "width"}),
    "resnet34": frozenset({"norm", "width"}),
    "resnet50": frozenset({"norm", "width"}),
    "xception": frozenset({"norm", "width"}),
}


def unsupported_options(arch: str, encoder: str, options: dict[str, object]) -> str | None:
    """Why ``options`` (set OPTION_FIELDS) do not fit ``arch`` on ``encoder``, or None when they do.
    ``arch`` and ``encoder`` must be registered names."""
    accepted = ARCHITECTURE_OPTIONS[arch] | ENCODER_OPTIONS[encoder]
    unsupported = sorted(k for k in options if k not in accepted)
    if not unsupported:
        return None
    supported = sorted(k for k in OPTION_FIELDS if k in accepted)
    return (f"model.{', model.'.join(unsupported)} not supported by arch {arch!r} with encoder {encoder!r}; "
            f"its settings are: {', '.join(supported)} (leave the others unset)")  # fmt: skip
