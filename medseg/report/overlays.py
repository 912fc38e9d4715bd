"""Slice overlays for the report: which cases to show (best / median / worst by Dice) and one slice
of each read from its files (image, reference, predicted mask) and drawn, reference green and
prediction red, on the slice with most reference lesion (else most predicted lesion, else the
middle one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medseg.geometry import AXIS_INDEX
from medseg.manifest import Case
from medseg.outputs import mask_file
from medseg.report import plots as reporting


def pick_cases(metrics: pd.DataFrame) -> list[tuple[str, str]]:
    """Best, median and worst case ids by Dice (first region)."""
    region = metrics["region"].iloc[0]
    ranked = metrics[metrics["region"] == region].sort_values("dice", ascending=False, kind="stable")
    ranked = ranked[ranked["dice"].notna()]
    if ranked.empty:
        return []
    picks = [("best", ranked.iloc[0]["case_id"]), ("median", ranked.iloc[len(ranked) // 2]["case_id"]),
             ("worst", ranked.iloc[-1]["case_id"])]
    seen: set[str] = set()
    return [(k, c) for k, c in picks if not (c in seen or seen.add(c))]


def overlay_png(case: Case, pred_dir: Path | None, axis: str, out: Path, title: str) -> Path | None:
    from medseg.geometry import to_ras
    from medseg.io import read_volume

    image = read_volume(case.images[case.channels[0]], check_finite=False)
    img_ras, affine = to_ras(image.array, image.affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    ref = pred = None
    if case.label is not None:
        ref = to_ras(read_volume(case.label).array > 0, image.affine)[0]
    mask_path = mask_file(pred_dir, case.case_id) if pred_dir else None
    if mask_path is not None and mask_path.is_file():
        pred = to_ras(read_volume(mask_path).array > 0, image.affine)[0]
    ax = AXIS_INDEX[axis]
    source = ref if ref is not None and ref.any() else pred
    others = tuple(a for a in range(3) if a != ax)
    index = int(np.argmax(source.sum(axis=others))) if source is not None and source.any() else img_ras.shape[ax] // 2
    take = lambda a: None if a is None else np.take(a, index, axis=ax)  # noqa: E731
    in_plane = tuple(float(spacing[a]) for a in others)
    return reporting.plot_overlay(take(img_ras), take(ref), take(pred), in_plane, out, f"{title} (slice {index})")  # type: ignore[arg-type]
