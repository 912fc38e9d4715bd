"""Models from other packages: the ``medseg.models`` entry-point group.

A package registers a builder under an entry point named ``arch.<name>`` or
``encoder.<name>``::

    # pyproject.toml of the plug-in package
    [project.entry-points."medseg.models"]
    "arch.tiny_fcn" = "my_models.fcn:build_tiny_fcn"
    "encoder.convnext_t" = "my_models.convnext:build_encoder"

An architecture builder is ``build(encoder, out_channels, **options) -> nn.Module`` (it may
ignore ``encoder``); an encoder builder is ``build(in_channels, **options) -> Encoder`` (the
contract of :mod:`medseg.models.encoders`). ``options`` are the config's ``model.options``. The
names then work in ``model.arch`` / ``model.encoder`` like built-in ones. Loading is lazy: a
plug-in's module is imported only when a config names it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medseg.errors import ConfigError
from medseg.model_names import plugin_entry_points


def load_plugin(kind: str, name: str) -> Callable[..., Any]:
    """The builder registered as ``<kind>.<name>``; raises ``ConfigError`` naming the entry point
    when it cannot be imported."""
    entry = plugin_entry_points()[kind].get(name)
    if entry is None:
        raise ConfigError(f"no plug-in model.{kind} {name!r} is installed (entry-point group medseg.models)")
    try:
        builder = entry.load()  # type: ignore[attr-defined]
    except Exception as exc:  # whatever the plug-in's import raises
        raise ConfigError(f"plug-in model.{kind} {name!r} ({entry.value}) cannot be loaded: {exc}") from exc  # type: ignore[attr-defined]
    if not callable(builder):
        raise ConfigError(f"plug-in model.{kind} {name!r} ({entry.value}) is not callable")  # type: ignore[attr-defined]
    return builder
