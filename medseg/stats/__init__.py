"""Lesion statistics: :mod:`.lesions` (per-slice lesion area and counts, 3-D lesions, the
lesion-distribution curve of one mask) and :mod:`.dataset` (``medseg stats`` over a manifest or
a prediction folder)."""
