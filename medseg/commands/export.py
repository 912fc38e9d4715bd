"""`medseg export CHECKPOINT --format onnx|torchscript|inference`: export a trained model and check it."""

from __future__ import annotations

import argparse

HELP = (
    "export a checkpoint to ONNX or TorchScript (checked against PyTorch) or to a slim medseg "
    "checkpoint for inference (no optimiser/training state)"
)

TOLERANCE = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint file written by medseg (training)")
    parser.add_argument(
        "--format",
        choices=["onnx", "torchscript", "inference"],
        required=True,
        help="export format (inference = medseg checkpoint without training state, for medseg infer)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output file (default: CHECKPOINT stem + .onnx / .torchscript.pt / _inference.pt)",
    )
    parser.add_argument("--height", type=int, default=256, help="example input height (default 256)")
    parser.add_argument("--width", type=int, default=256, help="example input width (default 256)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from medseg.errors import ConfigError, MedsegError
    from medseg.model_names import model_name
    from medseg.models.checkpoint import model_from_checkpoint, write_inference_checkpoint
    from medseg.models.export import SUFFIXES, export_model, onnxruntime_available, verify_export
    from medseg.run_folder import check_output_file

    if args.height < 1 or args.width < 1:
        raise ConfigError("--height and --width must be positive")
    model, cfg = model_from_checkpoint(args.checkpoint)
    checkpoint = Path(args.checkpoint)
    suffix = "_inference.pt" if args.format == "inference" else SUFFIXES[args.format]
    out = Path(args.out) if args.out else checkpoint.with_name(checkpoint.stem + suffix)
    if out.resolve() == checkpoint.resolve():
        raise ConfigError(f"{out}: --out would overwrite the checkpoint; choose another path")
    check_output_file(out)
    if args.format == "inference":
        write_inference_checkpoint(checkpoint, out)
        slim, _ = model_from_checkpoint(out)
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), slim.state_dict().values(), strict=True))
        if not same:
            raise MedsegError(f"{out}: weights differ from {checkpoint}")
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {checkpoint.stat().st_size / 1e6:.1f} MB before; "
              f"{model_name(cfg.arch, cfg.encoder, cfg.options)}, weights identical)")  # fmt: skip
        return 0
    from medseg.model_names import is_instance_arch

    if is_instance_arch(cfg.arch):
        raise ConfigError(f"{checkpoint}: {cfg.arch} cannot be traced to {args.format} (its proposals and boxes depend on "
                          "the image); use --format inference for a slim checkpoint medseg infer reads")
    torch.manual_seed(0)
    example = torch.randn(1, cfg.in_channels, args.height, args.width)
    export_model(model, out, args.format, example)
    print(f"wrote {out} ({args.format}, {model_name(cfg.arch, cfg.encoder, cfg.options)}, input (B, {cfg.in_channels}, H, W))")
    if args.format == "onnx" and not onnxruntime_available():
        print("not checked: onnxruntime is not installed (pip install 'medseg[export]')")
        return 0
    diff = verify_export(model, out, args.format, torch.randn(2, cfg.in_channels, args.height, args.width))
    print(f"max abs difference to PyTorch on a random input: {diff:.3g}")
    if diff >= TOLERANCE:
        raise MedsegError(f"{out}: exported model differs from PyTorch by {diff:.3g} (>= {TOLERANCE})")
    other = (args.height + 32, args.width)
    if verify_export(model, out, args.format, torch.randn(1, cfg.in_channels, *other)) >= TOLERANCE:
        print(f"warning: the exported model matches PyTorch only at {args.height}x{args.width}, not at "
              f"{other[0]}x{other[1]}: its trace fixed the input size (e.g. SwinUNETR's attention windows); "
              "export at the size you will run it at")
    return 0
