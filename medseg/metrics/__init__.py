"""Segmentation metrics on arrays: voxel overlap/distances, lesion matching, detection AP.

``voxel``: Dice, IoU, precision, recall, HD95, ASSD, volumes (one mask pair).
``lesion``: connected components, one-pass overlap table, IoU / any-overlap matching,
lesion-wise P/R/F1 and BraTS lesion-wise Dice.
``detection``: AP / mAP over ranked lesions, PR curves, per-slice detection.
``uncertainty``: patient-level bootstrap interval of a mean over cases.
``case_scores``: one case's masks -> its per-region table rows (``lesion_scores``: the
predicted lesions' detection scores); ``summary``: those rows pooled over the cases.
File handling lives in :mod:`medseg.evaluation.files`, the case loop in :mod:`medseg.evaluation.runner`.
"""

from __future__ import annotations

from medseg.geometry import label_components as label_lesions
from medseg.geometry import slice_axis
from medseg.metrics.detection import average_precision, mean_ap, rank_order, slice_detection
from medseg.metrics.lesion import lesion_counts, match_lesions, overlap_table
from medseg.metrics.voxel import global_dice, hd95_assd, voxel_metrics

__all__ = [
    "average_precision",
    "global_dice",
    "hd95_assd",
    "label_lesions",
    "lesion_counts",
    "match_lesions",
    "mean_ap",
    "overlap_table",
    "rank_order",
    "slice_axis",
    "slice_detection",
    "voxel_metrics",
]
