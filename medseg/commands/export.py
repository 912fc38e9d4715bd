"""`medseg export CHECKPOINT --format onnx|torchscript`: export a trained model and check it."""

from __future__ import annotations

import argparse

HELP = "export a checkpoint to ONNX or TorchScript and check it against PyTorch (max abs diff)"

TOLERANCE = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint file written by medseg (training)")
    parser.add_argument("--format", choices=["onnx", "torchscript"], required=True, help="export format")
    parser.add_argument(
        "--out", default=None, help="output file (default: CHECKPOINT stem + .onnx / .torchscript.pt)"
    )
    parser.add_argument("--height", type=int, default=256, help="example input height (default 256)")
    parser.add_argument("--width", type=int, default=256, help="example input width (default 256)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from medseg.errors import ConfigError, MedsegError
    from medseg.models.checkpoint import model_from_checkpoint
    from medseg.models.export import SUFFIXES, export_model, onnxruntime_available, verify_export

    if args.height < 1 or args.width < 1:
        raise ConfigError("--height and --width must be positive")
    model, cfg = model_from_checkpoint(args.checkpoint)
    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint.with_name(checkpoint.stem + SUFFIXES[args.format])
    if out.resolve() == checkpoint.resolve():
        raise ConfigError(f"{out}: --out would overwrite the checkpoint; choose another path")
    torch.manual_seed(0)
    example = torch.randn(1, cfg.in_channels, args.height, args.width)
    export_model(model, out, args.format, example)
    print(f"wrote {out} ({args.format}, {cfg.arch}/{cfg.encoder}, input (B, {cfg.in_channels}, H, W))")
    if args.format == "onnx" and not onnxruntime_available():
        print("not checked: onnxruntime is not installed (pip install 'medseg[export]')")
        return 0
    diff = verify_export(model, out, args.format, torch.randn(2, cfg.in_channels, args.height, args.width))
    print(f"max abs difference to PyTorch on a random input: {diff:.3g}")
    if diff >= TOLERANCE:
        raise MedsegError(f"{out}: exported model differs from PyTorch by {diff:.3g} (>= {TOLERANCE})")
    return 0
