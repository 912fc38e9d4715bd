"""`medseg synth`: write synthetic CT/MR phantoms with known lesions plus a manifest."""

from __future__ import annotations

import argparse

from medseg.commands import add_overwrite_option

HELP = "generate synthetic CT/MR phantoms with known lesions (NIfTI + manifest)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for the volumes")
    parser.add_argument("--n", type=int, default=12, help="number of cases (default 12)")
    parser.add_argument("--modality", choices=["MR", "CT"], default="MR", help="MR: flair+t1 channels; CT: one HU channel")
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 40], metavar=("I", "J", "K"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--manifest", default=None, help="manifest path (default OUT/data_manifest.csv)")
    parser.add_argument("--touching-pairs", type=int, default=0,
                        help="pairs of touching lesions per case (one connected component, two lesions)")
    parser.add_argument("--instance-labels", action="store_true",
                        help="label files hold one value per lesion (1..N); read with data.labels.instances: values")
    add_overwrite_option(parser)


def run(args: argparse.Namespace) -> int:
    from medseg.run_folder import check_output_file, claim_output_folder
    from medseg.synth import check_request, generate_dataset

    check_request(args.n, tuple(args.shape), args.modality, args.touching_pairs)  # before any folder or memory
    with claim_output_folder(args.out, "medseg synth", overwrite=args.overwrite):
        if args.manifest:
            check_output_file(args.manifest, "--manifest")
        manifest = generate_dataset(
            args.out, n_cases=args.n, modality=args.modality, shape=tuple(args.shape), seed=args.seed,
            manifest_path=args.manifest, touching_pairs=args.touching_pairs, instance_labels=args.instance_labels,
        )
    print(f"wrote {args.n} {args.modality} phantoms to {args.out}; manifest: {manifest}")
    return 0
