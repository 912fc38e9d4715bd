"""`medseg accelerate MODEL_DIR --manifest POOL.csv --backend B --precision P`: compile a model
folder's fold models for ONNX Runtime / OpenVINO and accept them only where their masks match
the fp32 torch ensemble on the cross-validation patients."""

from __future__ import annotations

import argparse

from medseg import outputs

HELP = "compile a model folder for onnxruntime/openvino (fp32, bf16, int8) and check it against torch on the CV patients"

EPILOG = f"""\
Every fold model of MODEL_DIR is exported into MODEL_DIR/{outputs.BACKENDS_DIR}/<backend>-<precision>/ (int8:
calibrated on each fold's training patients of --manifest). Then every cross-validation patient of the
folder that --manifest holds is predicted by the fp32 torch ensemble and by the compiled ensemble
(same preprocessing and post-processing); the variant is accepted only when the two masks reach Dice
>= 0.995 on every case. MODEL_DIR/{outputs.BACKENDS_RECORD} records the result (per-case Dice, timings, CPU,
library versions, the checkpoints' sha256); `medseg infer --model MODEL_DIR --set inference.backend=B
--set inference.precision=P` uses the variant only while that record accepts it for the same files.
precisions: onnxruntime fp32 | int8; openvino fp32 | bf16 (AVX-512 BF16 / AMX CPUs) | int8; auto = fp32.
exit status: 0 accepted; 1 refused (the lowest Dice and its case are printed); 2 nothing checked (bad
arguments, a read-only model folder, a missing package: one line on stderr).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="model folder (pipelines/auto.yaml's model/)")
    parser.add_argument("--manifest", required=True, metavar="CSV",
                        help="the pool manifest the folder was cross-validated on (its folds.json cases)")
    parser.add_argument("--backend", required=True, choices=["onnxruntime", "openvino"], help="runtime to compile for")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"],
                        help="compiled precision (auto = fp32)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads of both ensembles (inference.threads; default: torch's)")
    parser.add_argument("--calibration-slices", type=int, default=8, metavar="N",
                        help="int8: 2.5D stacks per training case (half with lesion, half without; default 8)")


def run(args: argparse.Namespace) -> int:
    from medseg.errors import ConfigError
    from medseg.inference.acceleration import accelerate

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if args.calibration_slices < 1:
        raise ConfigError(f"--calibration-slices must be >= 1, got {args.calibration_slices}")
    result = accelerate(args.model_dir, args.manifest, args.backend, args.precision, threads=args.threads,
                        calibration_per_case=args.calibration_slices, progress=print)  # fmt: skip
    entry = result.entry
    timings = entry["timings_s"]
    speed = timings["torch_fp32_predict"] / max(timings["backend_predict"], 1e-9)
    if result.accepted:
        print(f"{result.name}: accepted: min Dice {entry['min_dice']:.4f} ({entry['worst_case']}) over {entry['n_cases']} "
              f"case(s) >= {entry['threshold']}; network {speed:.2f}x torch fp32; recorded in {result.record}")
        return 0
    print(f"{result.name}: refused: Dice {entry['min_dice']:.4f} on case {entry['worst_case']} < {entry['threshold']} "
          f"(fp32 torch ensemble's mask as reference); recorded in {result.record}")
    return 1
