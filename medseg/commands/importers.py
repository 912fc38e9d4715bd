"""`medseg import {brats,nnunet,files,dicom}`: write a manifest from a common dataset layout."""

from __future__ import annotations

import argparse

HELP = "build a data_manifest.csv from a BraTS-like folder, an nnU-Net/MSD dataset, file globs or DICOM folders"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="MANIFEST", help="manifest to write (paths relative to its folder)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of patients for validation (default 0.2)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="share of patients for test (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="layout", metavar="LAYOUT")
    sub.required = True
    p = sub.add_parser("brats", help="folders of <case>_<channel>.nii.gz + <case>_seg.nii.gz")
    p.add_argument("dir")
    p.add_argument("--modality", choices=["MR", "CT"], default="MR")
    _common(p)
    p = sub.add_parser("nnunet", help="nnU-Net v2 raw dataset (dataset.json, imagesTr, labelsTr) or MSD 3-D dataset")
    p.add_argument("dir")
    p.add_argument("--modality", choices=["MR", "CT"], default=None, help="default: CT if a channel is named CT")
    _common(p)
    p = sub.add_parser("files", help="image/label pairs by glob, matched by file stem")
    p.add_argument("--images", required=True, help="glob of image files, e.g. 'data/*_ct.nii.gz' (quote it)")
    p.add_argument("--labels", default=None, help="glob of label files (matched to images by stem)")
    p.add_argument("--modality", choices=["MR", "CT"], required=True)
    p.add_argument("--channel", default="image", help="channel name of the images (column image_<channel>)")
    _common(p)
    p = sub.add_parser("dicom", help="one case per folder holding a DICOM series (labels from DICOM SEG / RTSTRUCT "
                                     "objects referencing it with --labels)",
                       description="case ids and patient ids are keyed pseudonyms of the DICOM PatientID (HMAC with "
                                   "the site secret: $MEDSEG_SITE_SECRET, $MEDSEG_SITE_SECRET_FILE or "
                                   "~/.config/medseg/site_secret, created on first use); folder names never "
                                   "become case ids")  # fmt: skip
    p.add_argument("dir")
    p.add_argument("--map-file", metavar="CSV", help="also write folder -> case_id here (the only link back to the "
                                                     "folders; keep it where identifiers may be kept)")
    p.add_argument("--labels", choices=["seg", "rtstruct"], default=None,
                   help="pair each series with the DICOM SEG / RTSTRUCT under DIR that references it (by UIDs) and "
                        "convert it to a label on the image grid (training rows); without: inference rows")
    p.add_argument("--select", metavar="REGEX", default=None,
                   help="with --labels: only segments / ROIs whose label / name matches (case-insensitive); "
                        "default all, as one lesion label")
    p.add_argument("--label-dir", metavar="DIR", default=None,
                   help="with --labels: where the converted labels go (default: labels/ beside --out)")
    _common(p)


def run(args: argparse.Namespace) -> int:
    from medseg import importers
    from medseg.errors import MedsegError
    from medseg.manifest import assign_patient_splits, read_manifest, write_manifest
    from medseg.output_folder import check_output_file

    check_output_file(args.out)
    if getattr(args, "map_file", None):
        check_output_file(args.map_file, "--map-file")
    if args.layout == "brats":
        cases = importers.import_brats(args.dir, modality=args.modality)
    elif args.layout == "nnunet":
        cases = importers.import_nnunet(args.dir, modality=args.modality)
    elif args.layout == "files":
        cases = importers.import_files(args.images, args.labels, modality=args.modality, channel=args.channel)
    else:
        label_dir = None
        if args.labels:
            from pathlib import Path

            from medseg.output_folder import check_output_folder

            label_dir = Path(args.label_dir) if args.label_dir else Path(args.out).parent / "labels"
            check_output_folder(label_dir, "--label-dir")
        elif args.select or args.label_dir:
            raise MedsegError("--select and --label-dir need --labels seg|rtstruct")
        cases = importers.import_dicom(args.dir, map_file=args.map_file, labels=args.labels, label_dir=label_dir,
                                       select=args.select)
    assign_patient_splits(cases, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    out = write_manifest(cases, args.out)
    read_manifest(out)  # validate what was written (files exist, columns consistent)
    counts = {s or "unassigned": sum(c.split == s for c in cases) for s in ("train", "val", "test", "")}
    print(f"wrote {out}: {len(cases)} case(s), channels {cases[0].channels}; splits {counts}")
    return 0
