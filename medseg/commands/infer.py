"""`medseg infer`: predict lesion masks for a manifest or for image files / DICOM folders."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from medseg import outputs
from medseg.commands import add_overwrite_option, add_set_option

HELP = "predict lesion masks (+ lesion tables) on the source grid of each input image"

EPILOG = """\
inputs:
  --manifest M          every row of a data manifest (or --split S), case ids from the manifest
  --input P [P ...]     one case per --input: one path per checkpoint channel, in the checkpoint's
                        channel order, or channel=PATH in any order; case=NAME sets the case id.
                        Single-channel checkpoints: every path is its own case.
                        Paths: NIfTI, NRRD, MHA/MHD files or DICOM series folders.
examples:
  medseg infer --checkpoint run/{BEST_CHECKPOINT} --manifest data_manifest.csv --split test --out preds/
  medseg infer --checkpoint run/{BEST_CHECKPOINT} --input flair=a_flair.nii.gz t1ce=a_t1ce.nii.gz t2=a_t2.nii.gz --out preds/
  medseg infer --checkpoint ct.pt --input scan1.nrrd scan2/ scan3.nii.gz --out preds/ --tta
  medseg infer --model runs/auto/RUN/model --manifest hospital.csv --out preds/   (fold ensemble + chosen rule)
outputs (in --out): <case>{MASK_SUFFIX}, <case>{LESIONS_SUFFIX}, <case>{LESIONS_CSV_SUFFIX}, optional
  <case>{PROB_SUFFIX}, <case>{DICOM_SEG_SUFFIX} (--output-format dicom-seg|both: DICOM SEG referencing the
  source series; dicom-seg alone writes no NIfTI mask), <case>{MARKER_SUFFIX} (marker), {FAILURES_FILE},
  {CASES_TABLE} (one row per predicted case: lesion count, total and largest lesion volume in mL,
  slices with lesion, what became of its DICOM SEG), {INFERENCE_RECORD} (settings and the model's
  identity), {RUN_LOG}. A re-run skips complete cases. Under torchrun each rank takes its share.
Before any inference every case is checked (preflight): files, modality of DICOM series against
  the model's, channels on one grid, a DICOM series with a Frame of Reference UID when a SEG is
  asked for (or inference.dicom_seg.missing_frame_of_reference=new). A one-channel model takes a
  manifest's one image column whatever its name.
A case that fails (refused by the preflight, unreadable image, non-finite probabilities from the
  model...) is recorded in {FAILURES_FILE} (case_id, error), none of its files is left, and the
  others go on; a case whose DICOM SEG alone cannot be written keeps its NIfTI mask and tables.
exit status: 0 every case predicted or already complete; 1 some case(s) failed ({FAILURES_FILE},
  the others done); 2 nothing ran (bad arguments, checkpoint or manifest: one line on stderr).
""".format(**{k: getattr(outputs, k) for k in ("MASK_SUFFIX", "LESIONS_SUFFIX", "LESIONS_CSV_SUFFIX", "PROB_SUFFIX",
                                         "MARKER_SUFFIX", "FAILURES_FILE", "INFERENCE_RECORD", "DICOM_SEG_SUFFIX",
                                         "CASES_TABLE", "RUN_LOG", "BEST_CHECKPOINT")})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", action="append", metavar="CKPT",
                       help="model checkpoint from medseg train; repeat to ensemble (probabilities averaged)")
    model.add_argument("--model", metavar="DIR",
                       help="model folder (pipelines/auto.yaml's model/): its fold models as one ensemble, with the "
                            "post-processing chosen on cross-validation")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", metavar="CSV", help="data manifest listing the cases")
    source.add_argument("--input", action="append", nargs="+", metavar="PATH", help="one case's channel paths (see below)")
    parser.add_argument("--split", choices=["train", "val", "test"], help="with --manifest: only this split")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, metavar="N", help="windows per forward pass (inference.batch_size)")
    parser.add_argument("--tta", action="store_true", help="average over in-plane flips (inference.tta)")
    parser.add_argument("--write-prob", action="store_true", help=f"also write <case>{outputs.PROB_SUFFIX} (inference.write_prob)")
    parser.add_argument("--output-format", choices=["nifti", "dicom-seg", "both"], default=None,
                        help=f"nifti masks (default), DICOM SEG <case>{outputs.DICOM_SEG_SUFFIX} referencing each DICOM source series "
                             "(cases that are not DICOM series fail), or both (inference.output_format)")
    add_set_option(parser, "override an inference setting, e.g. inference.min_lesion_mm3=50 (repeatable)",
                   metavar="inference.KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_overwrite_option(parser)


def _device(requested: str) -> str:
    """torchrun: ``cuda`` means this process' GPU (``LOCAL_RANK``)."""
    import os

    if requested == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return requested


def run(args: argparse.Namespace) -> int:
    from medseg.errors import MedsegError
    from medseg.logs import log_to_file
    from medseg.run_folder import claim_output_folder
    from medseg.runtime import torchrun_rank

    # first, before any model is loaded or case read: an unwritable or busy --out fails now
    with claim_output_folder(args.out, "medseg infer", overwrite=args.overwrite):
        if torchrun_rank()[0] != 0:  # one run.log, rank 0's; the other ranks log to their console
            return _run(args)
        log_file = Path(args.out) / outputs.RUN_LOG  # every log line of the run, the libraries' included
        try:
            with log_to_file(log_file):
                return _run(args)
        except MedsegError:  # refused before any case ran (one line on stderr): leave nothing behind
            log_file.unlink(missing_ok=True)
            raise


def _run(args: argparse.Namespace) -> int:
    from medseg.errors import MedsegError
    from medseg.inference.bundle import load_model_folder, merge_settings
    from medseg.inference.cases import cases_from_inputs, cases_from_manifest, check_cases
    from medseg.inference.runner import inference_patch, load_bundle, run_inference

    log = logging.getLogger("medseg.infer")
    options: dict[str, Any] = {}  # the typed options, on top of --set
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise MedsegError(f"--batch-size must be >= 1, got {args.batch_size}")
        options["batch_size"] = args.batch_size
    if args.tta:
        options["tta"] = True
    if args.write_prob:
        options["write_prob"] = True
    if args.output_format:
        options["output_format"] = args.output_format
    if args.split and not args.manifest:
        raise MedsegError("--split needs --manifest")
    # the user's --set inference.*, under the options above (a model folder's rule beneath both)
    settings = merge_settings(inference_patch(args.overrides), options)
    if args.model:
        bundle = load_model_folder(args.model, settings, device=_device(args.device))
    else:
        bundle = load_bundle(args.checkpoint, device=_device(args.device), settings=settings)
    if args.manifest:
        cases = cases_from_manifest(args.manifest, bundle.channels, bundle.modality, args.split)
    else:
        cases = cases_from_inputs(args.input, bundle.channels)
    cases = check_cases(cases)
    summary = run_inference(cases, bundle, args.out, show_progress=not args.no_progress)
    log.info("%d case(s) predicted, %d already complete, %d failed (%.1f s)",
             len(summary.done), len(summary.skipped), len(summary.failures), summary.seconds)
    for case_id, error in summary.failures:
        log.error("%s: %s", case_id, error)
    return 1 if summary.failures else 0
