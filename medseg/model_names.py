"""The model registry's names and the settings each builder takes, without importing torch.

Configs are validated against this table (``medseg.config`` never imports the models);
``medseg.models.registry`` checks at import that its dicts and its builders' signatures match
it, so the two cannot drift apart. Adding a model: register its builder in
``medseg/models/registry.py`` and its name and settings here.
"""

from __future__ import annotations

from collections.abc import Mapping

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
    "anchor_sizes",
)

# architecture name -> the OPTION_FIELDS its builder accepts
ARCHITECTURE_OPTIONS: dict[str, frozenset[str]] = {
    "unet": frozenset({"decoder_channels", "dropout", "norm", "residual"}),
    "unet_inception": frozenset({"decoder_channels", "dropout", "inception_branches", "norm", "residual"}),
    "deeplabv3plus": frozenset({"aspp_channels", "aspp_rates", "dropout", "norm", "output_stride", "width"}),
    "segnet": frozenset({"dropout", "norm"}),
    "maskrcnn": frozenset({"anchor_sizes"}),
}

# architectures that predict lesion instances (boxes, learned scores, masks) instead of a dense
# map: trained on per-slice instance targets (``data.labels.instances``), inferred per whole
# slice with 3-D linking (:mod:`medseg.inference.instances`)
INSTANCE_ARCHITECTURES: frozenset[str] = frozenset({"maskrcnn"})


def is_instance_arch(arch: str) -> bool:
    """True for architectures that predict lesion instances (:data:`INSTANCE_ARCHITECTURES`)."""
    return arch in INSTANCE_ARCHITECTURES

# architectures that work on some encoders only (others: every encoder)
ARCHITECTURE_ENCODERS: dict[str, frozenset[str]] = {
    "segnet": frozenset({"unet"}),  # max-unpooling needs pooling indices: the encoder must downsample by max-pools
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
    """Why ``options`` (set OPTION_FIELDS) do not fit ``arch`` on ``encoder``, or None when they do."""
    allowed = ARCHITECTURE_ENCODERS.get(arch)
    if allowed is not None and encoder in ENCODER_OPTIONS and encoder not in allowed:
        return (f"arch {arch!r} needs an encoder that downsamples by max-pooling (pooling indices): "
                f"{', '.join(sorted(allowed))}; {encoder!r} downsamples with strided convolutions")
    accepted = accepted_options(arch, encoder)
    unsupported = sorted(k for k in options if k not in accepted)
    if not unsupported:
        return None
    supported = sorted(k for k in OPTION_FIELDS if k in accepted)
    if not supported:
        return (f"model.{', model.'.join(unsupported)} not supported by arch {arch!r}: MONAI networks and plug-in "
                f"architectures take their settings in model.options; to drop them: {unset_fix(unsupported)}")
    return (f"model.{', model.'.join(unsupported)} not supported by arch {arch!r} with encoder {encoder!r}; "
            f"its settings are: {', '.join(supported)}; to drop the others: {unset_fix(unsupported)}")  # fmt: skip


def unset_fix(keys: list[str]) -> str:
    """The ``--set`` arguments that unset ``model.<key>`` for each of ``keys`` (the fix a message prints)."""
    return " ".join(f"--set model.{k}=null" for k in keys)


def builtin_only_settings(arch: str, settings: Mapping[str, object]) -> list[str]:
    """The OPTION_FIELDS set (not None) in ``settings`` that ``arch`` ignores because it is a
    MONAI network or a plug-in architecture (those take ``model.options``), sorted; empty for a
    built-in architecture, whose settings are checked by :func:`unsupported_options` instead.

    With these dropped, swapping a built-in model for ``monai:<Name>`` or a plug-in is one
    ``--set model.arch=...`` on any config (``medseg.config.ModelConfig`` drops them, saying which)."""
    if arch in ARCHITECTURE_OPTIONS:
        return []
    return sorted(k for k in OPTION_FIELDS if settings.get(k) is not None)


# --------------------------------------------------------------------------- MONAI networks by name

MONAI_PREFIX = "monai:"

# MONAI 2-D segmentation networks reachable as ``model.arch: monai:<Name>``: the constructor
# arguments medseg fills in when the config leaves them out (MONAI requires them or its default
# does not fit a 2-D slice), and how the input size must divide (pooling depth). ``spatial_dims``,
# ``in_channels`` and ``out_channels`` always come from medseg's config.
MONAI_NETWORKS: dict[str, dict[str, object]] = {
    "BasicUNet": {"defaults": {}, "multiple": 16},
    "BasicUNetPlusPlus": {"defaults": {}, "multiple": 16},
    "UNet": {"defaults": {"channels": [32, 64, 128, 256, 512], "strides": [2, 2, 2, 2], "num_res_units": 2},
             "multiple": "strides"},
    "AttentionUnet": {"defaults": {"channels": [32, 64, 128, 256, 512], "strides": [2, 2, 2, 2]}, "multiple": "strides"},
    "SegResNet": {"defaults": {}, "multiple": "blocks_down"},
    "DynUNet": {"defaults": {"kernel_size": [3, 3, 3, 3, 3], "strides": [1, 2, 2, 2, 2],
                             "upsample_kernel_size": [2, 2, 2, 2]}, "multiple": "strides"},
    "FlexibleUNet": {"defaults": {"backbone": "resnet34"}, "multiple": 32},
    "SwinUNETR": {"defaults": {}, "multiple": 32},
}

# FlexibleUNet's backbones (MONAI's encoder registry, no pretrained download: local weights only)
FLEXIBLE_UNET_BACKBONES: tuple[str, ...] = (
    "resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200",
    *(f"efficientnet-b{i}" for i in range(9)), "efficientnet-l2",
)  # fmt: skip


def is_monai_arch(name: str) -> bool:
    return name.startswith(MONAI_PREFIX)


def monai_network_name(arch: str) -> str:
    """``monai:SegResNet`` -> ``SegResNet``; raises ValueError for a network medseg does not list."""
    name = arch[len(MONAI_PREFIX):]
    if name not in MONAI_NETWORKS:
        raise ValueError(f"unknown MONAI network {name!r} in model.arch {arch!r}; listed 2-D networks: "
                         f"{', '.join(MONAI_PREFIX + n for n in MONAI_NETWORKS)}")  # fmt: skip
    return name


# --------------------------------------------------------------------------- plug-ins

PLUGIN_GROUP = "medseg.models"


def plugin_entry_points() -> dict[str, dict[str, object]]:
    """Models other packages register under the ``medseg.models`` entry-point group, by kind:
    ``{"arch": {name: entry_point}, "encoder": {name: entry_point}}``. Entry-point names are
    ``arch.<name>`` or ``encoder.<name>``; nothing is imported here (names only)."""
    from importlib.metadata import entry_points

    found: dict[str, dict[str, object]] = {"arch": {}, "encoder": {}}
    for ep in entry_points(group=PLUGIN_GROUP):
        kind, _, name = ep.name.partition(".")
        if kind in found and name:
            found[kind][name] = ep
    return found


def known_names(kind: str) -> list[str]:
    """Every name ``model.<kind>`` accepts: built-in, plug-in (and for arch ``monai:<Name>``)."""
    builtin = list(ARCHITECTURE_OPTIONS if kind == "arch" else ENCODER_OPTIONS)
    plugins = [n for n in plugin_entry_points()[kind] if n not in builtin]
    monai = [MONAI_PREFIX + n for n in MONAI_NETWORKS] if kind == "arch" else []
    return builtin + monai + plugins


def accepted_options(arch: str, encoder: str) -> frozenset[str]:
    """The OPTION_FIELDS ``arch`` on ``encoder`` take: none for MONAI networks and plug-ins
    (their settings go in ``model.options``)."""
    return ARCHITECTURE_OPTIONS.get(arch, frozenset()) | (
        ENCODER_OPTIONS.get(encoder, frozenset()) if arch in ARCHITECTURE_OPTIONS else frozenset())


# --------------------------------------------------------------------------- display names


def uses_encoder(arch: str) -> bool:
    """Whether ``arch`` builds on ``model.encoder``: every built-in architecture does; a MONAI
    network never does (``monai:FlexibleUNet`` has its own ``options.backbone``); a plug-in
    architecture does when its builder names an ``encoder`` argument (its module is imported)."""
    if arch in ARCHITECTURE_OPTIONS:
        return True
    entry = None if is_monai_arch(arch) else plugin_entry_points()["arch"].get(arch)
    if entry is None:
        return False
    import inspect

    try:
        return "encoder" in inspect.signature(entry.load()).parameters  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a plug-in that cannot be loaded: its build error says why
        return False


def model_name(arch: str, encoder: str, options: Mapping[str, object] | None = None) -> str:
    """How messages and tables name a model: ``arch / encoder`` where the encoder is used
    (:func:`uses_encoder`), ``monai:FlexibleUNet / <backbone>``, else the architecture alone
    (``monai:SegResNet``, not ``monai:SegResNet / resnet34``)."""
    if arch == MONAI_PREFIX + "FlexibleUNet":
        backbone = (options or {}).get("backbone") or MONAI_NETWORKS["FlexibleUNet"]["defaults"]["backbone"]  # type: ignore[index]
        return f"{arch} / {backbone}"
    return f"{arch} / {encoder}" if uses_encoder(arch) else arch
