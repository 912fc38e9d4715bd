"""`medseg models`: every registered architecture x encoder with params, GFLOPs and receptive field."""

from __future__ import annotations

import argparse

HELP = "list every architecture x encoder with parameters, GFLOPs per slice and receptive field"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", action="append", help="only this architecture (repeatable)")
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


def _rows(args: argparse.Namespace) -> list[list[str]]:
    from medseg.config import ModelConfig
    from medseg.errors import ConfigError
    from medseg.models.complexity import count_gflops, count_parameters, receptive_field
    from medseg.models.registry import ARCHITECTURES, ENCODERS, build_model, list_models

    for kind, names, registry in (("arch", args.arch, ARCHITECTURES), ("encoder", args.encoder, ENCODERS)):
        for name in names or []:
            if name not in registry:
                raise ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(registry)}")
    rows = []
    for arch, encoder in list_models():
        if (args.arch and arch not in args.arch) or (args.encoder and encoder not in args.encoder):
            continue
        cfg = ModelConfig(arch=arch, encoder=encoder, in_channels=args.in_channels, width=args.channel_width)
        model = build_model(cfg)
        rows.append(
            [
                arch,
                encoder,
                f"{count_parameters(model) / 1e6:.2f}",
                f"{count_gflops(model, args.in_channels, args.height, args.width):.2f}",
                str(receptive_field(model, args.in_channels)),
            ]
        )
    return rows


def run(args: argparse.Namespace) -> int:
    import torch

    from medseg.errors import ConfigError

    if args.in_channels < 1 or args.height < 1 or args.width < 1:
        raise ConfigError("--in-channels, --height and --width must be positive")
    torch.manual_seed(0)
    header = ["arch", "encoder", "params (M)", f"GFLOPs / {args.height}x{args.width} slice", "RF (px)"]
    rows = _rows(args)
    if args.format == "markdown":
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] * 2 + ["---:"] * 3) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return 0
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells))
    return 0
