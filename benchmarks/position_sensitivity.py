"""How much a trained 2.5D model's mask depends on where the slice sits in its input window.

A foreground-cropped slice predicted in one window padded at the bottom/right to the
network's stride multiple (this script's reference placement) and the same slice padded to
256x256 around its centre (MONAI ``sliding_window_inference`` with a 256x256 ROI, as in
``bench_inference.py``'s baseline) sit at different phases of the network's pooling grid. A
network with stride-2 max-pools is not shift-equivariant, so the two masks can differ
although both compute the same model on the same pixels. This script measures that on one
BraTS case, fp32, whole volume, masks post-processed and mapped to the source grid exactly
as ``medseg infer`` does (``predict_volume`` itself now places slices on the grid where the
configured ROI window would put them: ``medseg.inference.predictor.window_padding``):

- ``shift (dy, dx)``: the slice edge-padded by dy rows at the top and dx columns at the left
  (then to the stride multiple as usual); Dice of the mask against the unshifted one;
- ``centred in 256x256``: edge-padded to 256x256 around its centre (the baseline's input);
- every mask's Dice to the expert reference.

    .venv/bin/python benchmarks/position_sensitivity.py --checkpoint runs/brats_unet_inception/best.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_inference import BRATS, dice  # this folder is on sys.path when the script runs

SHIFTS = [(1, 0), (0, 1), (3, 5), (8, 8), (7, 13), (16, 16), (32, 32)]  # the U-Nets' stride is 32: (32, 32) keeps the pooling phase


@torch.no_grad()
def probabilities(model: torch.nn.Module, image: torch.Tensor, context: int, axis: int,
                  shift: tuple[int, int] = (0, 0), centre_in: int | None = None, batch: int = 8) -> torch.Tensor:
    """(R, A, S) foreground probabilities of ``image`` (C, R, A, S), slice by slice along
    ``axis``, each slice placed at ``shift`` or centred in a ``centre_in`` square (edge-padded)."""
    from medseg.transforms.preprocessing import context_stack

    n = image.shape[axis]
    out = torch.empty(image.shape[1:])
    out_view = torch.movedim(out, axis - 1, 0)
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        x = context_stack(image, idx, context, axis=axis)
        h, w = x.shape[-2:]
        top, left = shift
        if centre_in is not None:
            top, left = (centre_in - h) // 2, (centre_in - w) // 2
            x = F.pad(x, [left, centre_in - w - left, top, centre_in - h - top], mode="replicate")
        else:
            x = F.pad(x, [left, 0, top, 0], mode="replicate")
        out_view[start : start + len(idx)] = torch.sigmoid(model(x))[:, 0, top : top + h, left : left + w]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--case", default="Brats18_2013_20_1", help="BraTS case folder name")
    parser.add_argument("--brats-dir", default=str(BRATS))
    args = parser.parse_args()

    import nibabel as nib

    from medseg.inference.cases import InferenceCase
    from medseg.inference.postprocess import postprocess
    from medseg.inference.runner import CasePredictor, load_bundle
    from medseg.transforms.preprocessing import IMAGE_KEY

    case_dir = Path(args.brats_dir) / args.case
    if not case_dir.is_dir():
        print(f"BraTS case not found at {case_dir}", file=sys.stderr)
        return 1
    bundle = load_bundle([args.checkpoint], ["inference.precision=fp32"], "cpu")
    predictor = CasePredictor(bundle)
    case = InferenceCase(args.case, {c: case_dir / f"{args.case}_{c}.nii.gz" for c in bundle.channels})
    prepared = predictor.prepare(case)
    image = prepared.data[IMAGE_KEY].as_tensor()
    axis = predictor.ras_axis + 1
    model = bundle.models[0].to(memory_format=torch.contiguous_format).eval()
    context = bundle.config.preprocess.context_slices
    reference = np.asarray(nib.load(str(case_dir / f"{args.case}_seg.nii.gz")).dataobj) > 0

    def mask(prob: torch.Tensor) -> np.ndarray:
        source = predictor.to_source(prob[None], prepared)
        return postprocess(source[0], prepared.geometry.spacing, bundle.inference) > 0

    plain = mask(probabilities(model, image, context, axis))
    print(f"checkpoint {args.checkpoint}, case {args.case}, preprocessed {tuple(image.shape)}")
    print(f"{'placement':<22} {'Dice to unshifted':>18} {'Dice to reference':>18}")
    print(f"{'unshifted':<22} {1.0:>18.4f} {dice(plain, reference):>18.4f}")
    for shift in SHIFTS:
        m = mask(probabilities(model, image, context, axis, shift=shift))
        print(f"{'shift ' + str(shift):<22} {dice(m, plain):>18.4f} {dice(m, reference):>18.4f}")
    m = mask(probabilities(model, image, context, axis, centre_in=256))
    print(f"{'centred in 256x256':<22} {dice(m, plain):>18.4f} {dice(m, reference):>18.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
