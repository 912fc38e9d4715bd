"""`medseg import {brats,nnunet,files,dicom}`: write a manifest from a common dataset layout."""

from __future__ import annotations

import argparse

HELP = "build a data_manifest.csv from a BraTS-like folder, an nnU-Net/MSD dataset, file globs or DICOM folders"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="MANIFEST", help="manifest to write (paths relative to its folder)")
    p.add_argument("--val-fraction", type=_fraction, default=0.2,
                   help="share of patients for validation, in [0, 1) (default 0.2)")
    p.add_argument("--test-fraction", type=_fraction, default=0.0,
                   help="share of patients for test, in [0, 1) (default 0); val + test must stay below 1")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")


def _fraction(text: str) -> float:
    """argparse type of a share of patients: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (a share of patients, e.g. 0.2)") from None
    if not 0.0 <= value < 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1) (a share of patients, e.g. 0.2)")
    return value


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
    p = sub.add_parser("dicom", help="one case per DICOM series (or per study with --series); labels from DICOM SEG / "
                                     "RTSTRUCT objects referencing it with --labels",
                       description="one row per CT/MR series (localisers and other modalities are skipped with a "
                                   "line); each row's image is dicom_series/<case_id>/ beside the manifest, a folder of "
                                   "links to exactly that series' files. Case ids and patient ids are keyed pseudonyms "
                                   "of the DICOM PatientID (HMAC with the site secret: $MEDSEG_SITE_SECRET, "
                                   "$MEDSEG_SITE_SECRET_FILE or ~/.config/medseg/site_secret, created on first use); "
                                   "folder names never become case ids. Refused series are listed on stderr and in "
                                   "<manifest stem>_failures.csv; exit status 1 when some were refused")  # fmt: skip
    p.add_argument("dir")
    p.add_argument("--channel", metavar="NAME", default=None,
                   help="channel name of the rows (column image_<NAME>; default image)")
    p.add_argument("--model", metavar="PATH", default=None,
                   help="a model folder or checkpoint: its channel names and modality (only series of that modality "
                        "become rows)")
    p.add_argument("--series", metavar="NAME=REGEX", action="append", default=[],
                   help="repeatable: one row per study, channel NAME = the study's one series whose SeriesDescription "
                        "or ProtocolName matches REGEX (case-insensitive), e.g. --series flair=FLAIR --series t1=T1")
    p.add_argument("--modality", choices=["CT", "MR"], default=None, help="only series of this modality")
    p.add_argument("--allow-missing-patient-id", action="store_true",
                   help="key a series with an empty PatientID on its StudyInstanceUID (default: refuse it)")
    p.add_argument("--series-dir", metavar="DIR", default=None,
                   help="where the per-row series folders (links) go (default: dicom_series/ beside --out)")
    p.add_argument("--map-file", metavar="CSV", help="also write folder, series_uid -> case_id here (the only link "
                                                     "back to the folders; keep it where identifiers may be kept)")
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
    from medseg.run_folder import check_output_file

    if args.val_fraction + args.test_fraction >= 1.0:
        from medseg.errors import MedsegError

        raise MedsegError(f"--val-fraction {args.val_fraction:g} + --test-fraction {args.test_fraction:g} leave no "
                          "patient for training: their sum must stay below 1")
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
        return _run_dicom(args)
    _write(cases, args)
    return 0


def _write(cases: list, args: argparse.Namespace) -> None:
    from medseg.manifest import assign_patient_splits, read_manifest, write_manifest

    assign_patient_splits(cases, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    out = write_manifest(cases, args.out)
    read_manifest(out)  # validate what was written (files exist, columns consistent)
    counts = {s or "unassigned": sum(c.split == s for c in cases) for s in ("train", "val", "test", "")}
    print(f"wrote {out}: {len(cases)} case(s), channels {cases[0].channels}; splits {counts}")


def _run_dicom(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    import pandas as pd

    from medseg import importers
    from medseg.atomic import write_csv
    from medseg.dicom.import_series import SERIES_FOLDER
    from medseg.errors import MedsegError
    from medseg.outputs import FAILURES_FILE
    from medseg.run_folder import check_output_file, check_output_folder

    out = Path(args.out)
    failures = out.with_name(f"{out.stem}_{FAILURES_FILE}")
    check_output_file(failures, "--out")
    label_dir = None
    if args.labels:
        label_dir = Path(args.label_dir) if args.label_dir else out.parent / "labels"
        check_output_folder(label_dir, "--label-dir")
    elif args.select or args.label_dir:
        raise MedsegError("--select and --label-dir need --labels seg|rtstruct")
    series_dir = check_output_folder(Path(args.series_dir) if args.series_dir else out.parent / SERIES_FOLDER,
                                     "--series-dir")  # fmt: skip
    result = importers.import_dicom(args.dir, map_file=args.map_file, labels=args.labels, label_dir=label_dir,
                                    select=args.select, series_dir=series_dir, channel=args.channel, model=args.model,
                                    series=args.series, modality=args.modality,
                                    allow_missing_patient_id=args.allow_missing_patient_id)  # fmt: skip
    for refusal in result.refusals:
        print(f"refused {refusal.what}: {refusal.error}", file=sys.stderr)
    write_csv(failures, pd.DataFrame(result.failure_rows(), columns=["what", "error"]))
    if not result.cases:
        raise MedsegError(f"{args.dir}: no usable CT/MR series ({len(result.refusals)} refused, listed above and in "
                          f"{failures})")  # fmt: skip
    _write(result.cases, args)
    if result.refusals:
        print(f"{len(result.refusals)} refused (one line each above; the good rows are written): see {failures}", file=sys.stderr)
        return 1
    return 0
