"""`medseg models`: every model medseg can build with params, GFLOPs and receptive field;
``--compare CONFIG...``: the models of configs side by side, with measured CPU speed."""

from __future__ import annotations

import argparse

HELP = "list every architecture x encoder (and MONAI / plug-in network) with parameters, GFLOPs and receptive field"

EPILOG = """\
examples:
  medseg models                                       built-in pairs, monai:<Name> networks, plug-ins
  medseg models --arch unet_inception --format markdown
  medseg models --compare configs/brats_unet_inception.yaml my_segresnet.yaml
    one row per config: params, GFLOPs and CPU slices/s at its train.patch_size, receptive field
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--arch", action="append", help="only this architecture (repeatable; monai:<Name> too)")
    parser.add_argument("--encoder", action="append", help="only this encoder (repeatable)")
    parser.add_argument("--in-channels", type=int, default=3, help="input channels (default 3)")
    parser.add_argument("--height", type=int, default=256, help="slice height for GFLOPs (default 256)")
    parser.add_argument("--width", type=int, default=256, help="slice width for GFLOPs (default 256)")
    parser.add_argument(
        "--channel-width", type=float, default=None, help="channel multiplier (model.width; default 1)"
    )
    parser.add_argument(
        "--format", choices=["table", "markdown"], default="table", help="plain table or Markdown"
    )
    parser.add_argument("--compare", nargs="+", metavar="CONFIG",
                        help="compare the models of these config files (measures CPU slices/s, a few seconds each)")
    parser.add_argument("--batch", type=int, default=4, help="--compare: slices per timed forward pass (default 4)")


def _catalogue(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(arch, encoder) pairs to list: built-in pairs, monai:<Name> (encoder '-'), plug-ins."""
    from medseg.errors import ConfigError
    from medseg.model_names import known_names
    from medseg.models.registry import ARCHITECTURES, ENCODERS, list_models

    archs, encoders = known_names("arch"), known_names("encoder")
    for kind, names, valid in (("arch", args.arch, archs), ("encoder", args.encoder, encoders)):
        for name in names or []:
            if name not in valid:
                raise ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(valid)}")
    pairs = list_models()
    pairs += [(a, e) for a in archs if a in ARCHITECTURES for e in encoders if e not in ENCODERS]  # plug-in encoders
    pairs += [(a, "-") for a in archs if a not in ARCHITECTURES]  # monai:<Name> and plug-in architectures
    return [(a, e) for a, e in pairs
            if (not args.arch or a in args.arch) and (not args.encoder or e in args.encoder or e == "-")]  # fmt: skip


def _rows(args: argparse.Namespace) -> tuple[list[list[str]], list[str]]:
    """The table rows, and one line per model that could not be built or measured at these
    settings (e.g. a plug-in that ignores ``in_channels``): the others are still listed."""
    from medseg.config import ModelConfig
    from medseg.models.complexity import count_gflops, count_parameters, receptive_field
    from medseg.models.registry import build_model

    rows, problems = [], []
    for arch, encoder in _catalogue(args):
        # "-": monai:<Name> / plug-in architectures, which take neither an encoder nor model.width
        own_encoder = {"encoder": encoder, "width": args.channel_width} if encoder != "-" else {}
        try:
            cfg = ModelConfig(arch=arch, in_channels=args.in_channels, **own_encoder)
            model = build_model(cfg)
            rows.append([arch, encoder, f"{count_parameters(model) / 1e6:.2f}",
                         f"{count_gflops(model, args.in_channels, args.height, args.width):.2f}",
                         str(receptive_field(model, args.in_channels))])  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - one model that fails is named, the others listed
            name = arch if encoder == "-" else f"{arch} / {encoder}"
            problems.append(f"{name} at --in-channels {args.in_channels}, {args.height}x{args.width}: "
                            f"{_first_line(exc)}")
    return rows, problems


def _first_line(exc: Exception) -> str:
    from medseg.errors import MedsegError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, MedsegError) else f"{type(exc).__name__}: {text}"


def slices_per_second(model, in_channels: int, height: int, width: int, batch: int, rounds: int = 3) -> float:
    """CPU inference speed: ``batch`` slices per eval-mode forward pass, best of ``rounds`` after a warm-up."""
    import time

    import torch

    model.eval()
    x = torch.randn(batch, in_channels, height, width)
    best = float("inf")
    with torch.inference_mode():
        model(x)
        for _ in range(rounds):
            start = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - start)
    return batch / best


def _compare_rows(args: argparse.Namespace) -> tuple[list[str], list[list[str]]]:
    from pathlib import Path

    from medseg.config import load_config
    from medseg.model_names import model_name
    from medseg.models.complexity import count_gflops, count_parameters, receptive_field
    from medseg.models.registry import build_model

    rows = []
    for path in args.compare:
        cfg = load_config(path)
        model = build_model(cfg.model)
        h, w = cfg.train.patch_size
        name = model_name(cfg.model.arch, cfg.model.encoder, cfg.model.options)
        rows.append([Path(path).name, name, f"{count_parameters(model) / 1e6:.2f}",
                     f"{count_gflops(model, cfg.model.in_channels, h, w):.2f}",
                     f"{slices_per_second(model, cfg.model.in_channels, h, w, args.batch):.1f}",
                     str(receptive_field(model, cfg.model.in_channels)), f"{h}x{w}"])  # fmt: skip
    header = ["config", "model", "params (M)", "GFLOPs / slice", "CPU slices/s", "RF (px)", "patch"]
    return header, rows


def _print(header: list[str], rows: list[list[str]], fmt: str, text_columns: int) -> None:
    if fmt == "markdown":
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] * text_columns + ["---:"] * (len(header) - text_columns)) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) if i < text_columns else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from medseg.errors import ConfigError

    if args.in_channels < 1 or args.height < 1 or args.width < 1 or args.batch < 1:
        raise ConfigError("--in-channels, --height, --width and --batch must be positive")
    torch.manual_seed(0)
    if args.compare:
        header, rows = _compare_rows(args)
        _print(header, rows, args.format, 2)
        return 0
    header = ["arch", "encoder", "params (M)", f"GFLOPs / {args.height}x{args.width} slice", "RF (px)"]
    rows, problems = _rows(args)
    if rows:
        _print(header, rows, args.format, 2)
    if any(r[0] == "monai:FlexibleUNet" for r in rows):
        from medseg.model_names import FLEXIBLE_UNET_BACKBONES

        print(f"\nmonai:FlexibleUNet (row: resnet34) takes model.options.backbone: {', '.join(FLEXIBLE_UNET_BACKBONES)}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0
