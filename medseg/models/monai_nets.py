"""MONAI 2-D networks by name (``model.arch: monai:<Name>``), behind medseg's model contract.

``build_monai_network("SegResNet", in_channels=9, out_channels=1, options={...})`` returns a
:class:`MonaiNetwork`: ``(B, in_channels, H, W) -> (B, out_channels, H, W)`` logits for any H, W
(the input is edge-padded to the network's size multiple and the output cropped back, like
medseg's own models; ``multiple`` tells the predictor the pooling grid). Deep-supervision
outputs (lists) are reduced to the full-resolution head. The options are the network
constructor's own arguments, checked against its signature first: an unknown one is an error
listing the accepted ones. Nothing is downloaded: ``pretrained=True`` is refused (use
``model.pretrained`` with a local file).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from medseg.errors import ConfigError
from medseg.model_names import FLEXIBLE_UNET_BACKBONES, MONAI_NETWORKS
from medseg.models.blocks import pad_to_multiple

# constructor arguments medseg sets itself
FILLED = ("spatial_dims", "in_channels", "out_channels", "dimensions")


def monai_class(name: str) -> type[nn.Module]:
    import monai.networks.nets as nets

    return getattr(nets, name)


def accepted_arguments(name: str) -> list[str]:
    """Constructor arguments of MONAI network ``name`` a config may set (``model.options``)."""
    params = inspect.signature(monai_class(name).__init__).parameters
    return [p for p in params if p not in ("self", *FILLED) and params[p].kind not in (
        inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]


def size_multiple(name: str, options: Mapping[str, Any]) -> int:
    """How the input height/width must divide for network ``name`` with ``options``."""
    rule = MONAI_NETWORKS[name]["multiple"]
    if rule == "strides":
        return math.prod(int(s) if not isinstance(s, list | tuple) else int(s[0]) for s in options["strides"])
    if rule == "blocks_down":
        return 2 ** (len(options.get("blocks_down", (1, 2, 2, 4))) - 1)
    return int(rule)  # type: ignore[call-overload]


class MonaiNetwork(nn.Module):
    """A MONAI network under medseg's contract (module docstring); ``net`` is the MONAI module."""

    def __init__(self, net: nn.Module, multiple: int, name: str) -> None:
        super().__init__()
        self.net = net
        self.multiple = multiple
        self.network_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        out = self.net(pad_to_multiple(x, self.multiple))
        if isinstance(out, list | tuple):  # deep supervision: the full-resolution head comes first
            out = out[0]
        if out.ndim != 4:
            raise RuntimeError(f"MONAI {self.network_name} returned shape {tuple(out.shape)}; medseg needs "
                               "(B, C, H, W) (turn deep supervision off)")
        return out[..., :h, :w]


def build_monai_network(name: str, in_channels: int, out_channels: int, options: Mapping[str, Any] | None) -> MonaiNetwork:
    """MONAI network ``name`` as a 2-D model (module docstring). Raises ``ConfigError`` for an
    option the constructor does not take, a value it rejects, or a download request."""
    given = dict(options or {})
    accepted = accepted_arguments(name)
    unknown = sorted(k for k in given if k not in accepted)
    if unknown:
        raise ConfigError(f"model.options {', '.join(unknown)} not accepted by MONAI {name}; its arguments: "
                          f"{', '.join(accepted)} (spatial_dims, in_channels, out_channels come from the config)")
    if given.get("pretrained"):
        raise ConfigError(f"model.options.pretrained would download weights for MONAI {name}; medseg never "
                          "downloads: set model.pretrained to a local file instead")
    settings = {**dict(MONAI_NETWORKS[name]["defaults"]), **given}  # type: ignore[arg-type]
    if name == "FlexibleUNet" and settings.get("backbone") not in FLEXIBLE_UNET_BACKBONES:
        raise ConfigError(f"model.options.backbone {settings.get('backbone')!r} is not a FlexibleUNet backbone; "
                          f"valid: {', '.join(FLEXIBLE_UNET_BACKBONES)}")
    try:
        net = monai_class(name)(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, **settings)
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise ConfigError(f"MONAI {name} with options {settings}: {exc}") from None
    except ImportError as exc:  # an optional dependency of the network (einops for SwinUNETR)
        raise ConfigError(f"MONAI {name} needs a package that is not installed: {exc}") from None
    return MonaiNetwork(net, size_multiple(name, settings), name)
