"""Local pretrained weights into an encoder: key-name maps, first-conv adaptation, a report.

``model.pretrained: PATH`` (never a URL) is read with ``torch.load(weights_only=True)``. The
file may hold a plain state dict or one under ``state_dict`` / ``model`` (medseg checkpoints,
timm/Lightning files); a ``module.`` prefix (DDP) is dropped. ``model.pretrained_map`` names the
key layout:

==============  ===========================================================================
``medseg``      medseg's own encoder keys (``stages.*``), or a medseg checkpoint's ``encoder.*``
``torchvision`` torchvision ResNet (``conv1``, ``bn1``, ``layer1..4``, ``fc``): the stem conv/norm
                -> ``stages.0.0`` / ``stages.0.1``, ``layer1`` -> ``stages.1.1`` (after the
                max-pool), ``layer2..4`` -> ``stages.2..4``; inside a block the names are the
                same (MONAI's ResNet blocks use torchvision's ``conv1``/``bn1``/``downsample``)
``timm``        timm ResNet: the same names as torchvision
``monai``       MONAI ResNet (``monai.networks.nets.ResNet``): the same names as torchvision
==============  ===========================================================================

The classifier (``fc.*``) is not part of an encoder: it is listed as ignored, never an error.
For ``monai:FlexibleUNet`` the target is the network's encoder, whose ResNet keys already use
torchvision's names (every map but ``medseg`` keeps them as they are).

First-conv adaptation (2.5D inputs: channels x context slices): a kernel trained on ``I`` input
channels is given to ``in_channels`` inputs by :func:`medseg.models.encoders.adapt_input_conv` --
summed over its inputs for one channel, otherwise its input channels repeated cyclically and
scaled by ``I / in_channels``, so an input whose channels all carry the same image gives the
same pre-activation as the original network on that image.

Strict (default): every encoder key must be filled and every file key (bar the classifier) used,
with equal shapes; otherwise a ``MedsegError`` naming the file lists the first differences.
``pretrained_strict: false`` loads the keys that fit and reports the rest.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.models.encoders import adapt_input_conv

log = logging.getLogger(__name__)

RESNET_RENAMES = ((r"^conv1\.", "stages.0.0."), (r"^bn1\.", "stages.0.1."), (r"^layer1\.", "stages.1.1."),
                  (r"^layer2\.", "stages.2."), (r"^layer3\.", "stages.3."), (r"^layer4\.", "stages.4."))  # fmt: skip
CLASSIFIER = re.compile(r"^(fc|head|classifier|last_linear)\.")
KEY_MAPS = ("medseg", "torchvision", "timm", "monai")


@dataclass
class PretrainedReport:
    """What loading a weights file did: keys filled, left at their initialisation (missing),
    in the file but unused (unexpected), classifier keys ignored, input convs adapted."""

    path: Path
    key_map: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"{self.path.name} ({self.key_map} keys): {len(self.matched)} matched, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.ignored)} classifier keys ignored")
        if self.adapted:
            text += f"; input conv adapted: {', '.join(self.adapted)}"
        return text


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file (``weights_only=True``), unwrapped and without ``module.``."""
    if not path.is_file():
        raise MedsegError(f"{path}: pretrained weights file not found (model.pretrained)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with non-tensor objects, ...
        raise MedsegError(f"{path}: cannot read pretrained weights ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise MedsegError(f"{path}: expected a state dict of tensors, got {type(loaded).__name__}")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def map_keys(state: dict[str, torch.Tensor], key_map: str, medseg_layout: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` renamed from ``key_map``'s layout to the target's; returns it and the classifier
    keys dropped. ``medseg_layout``: the target is a medseg encoder (else a MONAI encoder, whose
    ResNet keys are torchvision's)."""
    if key_map not in KEY_MAPS:
        raise MedsegError(f"unknown model.pretrained_map {key_map!r}; valid: {', '.join(KEY_MAPS)}")
    ignored = [k for k in state if CLASSIFIER.match(k)]
    state = {k: v for k, v in state.items() if not CLASSIFIER.match(k)}
    if key_map == "medseg":
        if any(k.startswith("encoder.") for k in state):
            state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        return state, ignored
    if not medseg_layout:
        return state, ignored
    out = {}
    for key, value in state.items():
        for pattern, target in RESNET_RENAMES:
            if re.match(pattern, key):
                key = re.sub(pattern, target, key)
                break
        out[key] = value
    return out, ignored


def load_pretrained(
    target: nn.Module,
    path: str | Path,
    key_map: str = "medseg",
    strict: bool = True,
    input_conv_keys: list[str] | None = None,
    in_channels: int | None = None,
    medseg_layout: bool = True,
) -> PretrainedReport:
    """Load the local weights file ``path`` into ``target`` (module docstring); returns the report.

    ``input_conv_keys`` / ``in_channels``: the convs reading the raw input and the input channel
    count they are adapted to (default: the medseg encoder's own)."""
    path = Path(path)
    if input_conv_keys is None:
        input_conv_keys = list(getattr(target, "input_conv_keys", []))
    if in_channels is None:
        in_channels = int(getattr(target, "in_channels", 0))
    own = target.state_dict()
    if key_map in ("torchvision", "timm", "monai") and medseg_layout and "stages.1.1.0.conv1.weight" not in own:
        raise MedsegError(f"{path}: model.pretrained_map {key_map} holds ResNet weights; this encoder is not a "
                          "ResNet (resnet18/34/50), use pretrained_map medseg with its own weights")
    state, ignored = map_keys(read_state_dict(path), key_map, medseg_layout)
    report = PretrainedReport(path, key_map, ignored=sorted(ignored))
    for key in input_conv_keys:
        if key in state and state[key].ndim == 4 and in_channels and state[key].shape[1] != in_channels:
            state[key] = adapt_input_conv(state[key], in_channels)
            report.adapted.append(key)
    mismatched = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and own[k].shape != v.shape]  # fmt: skip
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    report.matched = sorted(fitting)
    report.missing = sorted(k for k in own if k not in fitting)
    report.unexpected = sorted(k for k in state if k not in own)
    if strict and (report.missing or report.unexpected or mismatched):
        problems = [f"shape {m}" for m in mismatched[:3]] + [f"missing {k}" for k in report.missing[:3]] + \
                   [f"unexpected {k}" for k in report.unexpected[:3]]  # fmt: skip
        raise MedsegError(f"{path}: weights do not fit this encoder ({len(report.missing)} missing, "
                          f"{len(report.unexpected)} unexpected, {len(mismatched)} of another shape): "
                          f"{'; '.join(problems)} (model.pretrained_map is {key_map!r}; "
                          "model.pretrained_strict: false loads the keys that fit)")
    target.load_state_dict(fitting, strict=False)
    log.info("pretrained weights %s", report.summary())
    return report
