"""MONAI transform chains, grouped by kind: :mod:`.loading` (files -> channel-first volumes with
their affine, label mapping, grid checks), :mod:`.preprocessing` (orientation, crop, CT window /
MR z-score; the same chain for training and inference, inverted for outputs) and
:mod:`.augment` (training-time 2-D augmentation of slice stacks)."""
