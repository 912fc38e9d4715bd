"""`medseg export-seg`: a mask made elsewhere (NIfTI/NRRD/MHA) as a DICOM SEG referencing its series."""

from __future__ import annotations

import argparse

from medseg.commands import add_set_option

HELP = "write a mask file as a DICOM Segmentation referencing the DICOM series it was drawn on"

EPILOG = """\
The mask must be on the series' voxel grid: the same voxels, in any axis order or direction
(a NIfTI saved in RAS order for an LPS series is re-indexed exactly); a mask on another grid
(resampled, cropped, shifted) is refused -- resample it onto the series first. Voxels > 0 are the
lesion (one segment); --multi-class writes one segment per distinct label value instead
(at most 255).
The SEG copies the series' patient and study attributes (it belongs to the same patient).
examples:
  medseg export-seg preds/P1_s1_lesion.nii.gz --reference dicom/P1/CT --out P1_seg.dcm
  medseg export-seg lesion.nrrd --reference series/ --out seg.dcm --set dicom_seg.segment_label=metastasis
exit status: 0 written; 2 nothing written (one line on stderr naming the file and the problem).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("mask", help="mask file (NIfTI, NRRD, MHA) on the reference series' grid")
    parser.add_argument("--reference", required=True, metavar="DICOM_DIR", help="folder holding the DICOM series")
    parser.add_argument("--out", required=True, metavar="SEG.dcm", help="DICOM SEG file to write")
    parser.add_argument("--multi-class", action="store_true", help="one segment per distinct label value, at most 255 (default: > 0)")
    add_set_option(parser, "a SEG setting, e.g. dicom_seg.segment_label=metastasis or "
                           "dicom_seg.property_type.meaning=Neoplasm (inference.dicom_seg keys; repeatable)",
                   metavar="dicom_seg.KEY=VALUE")


def seg_settings(overrides: list[str]):
    """``dicom_seg.key=value`` texts -> validated :class:`medseg.config.DicomSegConfig`."""
    from pydantic import ValidationError

    from medseg.config import DicomSegConfig, format_validation_error, parse_override, set_dotted
    from medseg.errors import ConfigError

    tree: dict = {}
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        if parts[0] == "inference":
            parts = parts[1:]
        if len(parts) < 2 or parts[0] != "dicom_seg" or "" in parts:
            raise ConfigError(f"--set {text!r}: only dicom_seg.<key> can be set here")
        set_dotted(tree, ".".join(parts), value)
    try:
        return DicomSegConfig.model_validate(tree.get("dicom_seg", {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error("--set (dicom_seg)", exc)) from None


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from medseg.dicom.seg_writer import check_segment_count, write_dicom_seg
    from medseg.errors import InputFileError, MedsegError, printable_path
    from medseg.geometry import reindex_onto
    from medseg.io import read_volume
    from medseg.labels import present_values
    from medseg.run_folder import check_output_file

    settings = seg_settings(args.overrides)
    check_output_file(args.out)
    reference = Path(args.reference)
    if not reference.is_dir():
        raise InputFileError(reference, "--reference must be a folder holding the DICOM series")
    series = read_volume(reference)
    mask_volume = read_volume(args.mask)
    mask = reindex_onto(mask_volume.array, mask_volume.affine, series.shape, series.affine)
    if mask is None:
        raise InputFileError(
            args.mask, f"mask grid (shape {mask_volume.shape}, spacing {np.round(mask_volume.spacing, 4).tolist()}) "
                       f"does not coincide with the series grid (shape {series.shape}, spacing "
                       f"{np.round(series.spacing, 4).tolist()}, {reference}); resample the mask onto the series first")
    if (mask.dtype.kind == "f" and not np.array_equal(mask, np.round(mask))) or (mask.size and mask.min() < 0):
        raise InputFileError(args.mask, "mask values must be non-negative integers (a label map, not probabilities)")
    classes = None
    if args.multi_class:
        # one segment per distinct value present (never per value up to the largest), bounded
        # before anything of that size is allocated
        classes = [v for v in present_values(mask) if v > 0] or None
        check_segment_count(len(classes or ()), printable_path(args.mask))
    else:
        mask = (mask > 0).astype(np.uint8)
    if settings.fractional:
        raise MedsegError("dicom_seg.fractional needs a probability map; export-seg writes BINARY SEGs")
    out = write_dicom_seg(mask, series.geometry, reference, args.out, settings, classes=classes)
    n_classes = len(classes) if classes else 1
    print(f"wrote {out}: {int((mask > 0).sum())} lesion voxel(s), {n_classes} segment(s), referencing "
          f"{series.shape[2]} instance(s)")
    return 0
