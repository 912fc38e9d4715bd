"""How many digits the numbers in medseg's CSV tables keep: one rule, by column name.

A float column is written to the precision its measurement supports, so that a table reads
``81.85`` (mm) rather than ``81.84700000000001``. The rule goes by the column's name (the unit
suffix medseg's tables carry), first match wins:

==============================================  =============================================
column name                                     written as
==============================================  =============================================
contains ``score`` (``score_mean``, ``qc_score``) 6 significant digits: scores rank lesions
                                                for AP (re-read from the lesion tables), so
                                                they keep the precision they always had
ends ``_mm3`` (``volume_mm3``)                  0.1 mm^3
ends ``_ml`` (``volume_ml``, ``total_volume_ml``) 0.0001 mL (= 0.1 mm^3)
ends ``_mm2`` (``lesion_area_mm2``)             0.01 mm^2
ends ``_mm`` or holds ``_mm_`` (``hd95_mm``,    0.01 mm
``centroid_x_ras_mm``)
starts ``spacing`` (``spacing_r``)              0.0001 mm (a voxel size, not a measurement)
a fraction word among its ``_``-separated       4 digits after the point
parts: dice, iou, precision, recall, f1,
sensitivity, specificity, fraction, share, ap,
position, rel, threshold; or a statistic word:  (a curve's ``mean`` of lesion areas in mm^2 is
mean, median, q25, q75, std                     then kept to 0.0001 mm^2, finer than needed)
any other float column (centroid indices,       10 significant digits: only the binary
losses, learning rates)                         noise of a float goes
==============================================  =============================================

Integer, boolean and text columns (ids, counts, flags) are never touched, and neither is
anything but a CSV table: probability maps are volumes. Every table goes through
:func:`round_table` in :func:`medseg.atomic.write_csv` (and the per-case lesion tables of
:mod:`medseg.inference.case_files`). Tables medseg reads back for computation see the rounded
values: the mean of Dice values rounded to 4 digits moves by less than 5e-5.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# ``_``-separated parts of a column name that make it a fraction in [0, 1] (or a ratio) -> 4 digits
FRACTION_WORDS = frozenset({"dice", "iou", "precision", "recall", "f1", "sensitivity", "specificity", "fraction",
                            "share", "ap", "position", "rel", "threshold"})  # fmt: skip
# parts naming a summary statistic of a column whose unit the name does not carry -> 4 digits
STATISTIC_WORDS = frozenset({"mean", "median", "q25", "q75", "std"})
SCORE_DIGITS = 6  # significant digits of score columns
OTHER_DIGITS = 10  # significant digits of columns no rule names


def column_rule(column: str) -> tuple[str, int]:
    """``("decimals", n)`` or ``("significant", n)`` for a float column called ``column`` (module
    docstring)."""
    name = column.lower()
    if "score" in name:
        return "significant", SCORE_DIGITS
    if name.endswith("_mm3"):
        return "decimals", 1
    if name.endswith("_ml"):
        return "decimals", 4
    if name.endswith("_mm2"):
        return "decimals", 2
    if name.endswith("_mm") or "_mm_" in name:
        return "decimals", 2
    if name.startswith("spacing"):
        return "decimals", 4
    if (FRACTION_WORDS | STATISTIC_WORDS) & set(name.split("_")):
        return "decimals", 4
    return "significant", OTHER_DIGITS


def significant(values: pd.Series, digits: int) -> pd.Series:
    """``values`` (float) to ``digits`` significant digits; NaN and infinities unchanged."""
    array = values.to_numpy(dtype=np.float64)
    out = np.array([float(f"{v:.{digits}g}") if np.isfinite(v) else v for v in array], dtype=np.float64)
    return pd.Series(out, index=values.index, name=values.name)


def round_table(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every float column rounded by :func:`column_rule`; other columns, and
    ``frame`` itself, unchanged (a copy is returned when a column changes)."""
    out = frame
    for position, column in enumerate(frame.columns):
        series = frame.iloc[:, position]
        if not pd.api.types.is_float_dtype(series.dtype):
            continue
        kind, digits = column_rule(str(column))
        rounded = series.round(digits) if kind == "decimals" else significant(series, digits)
        rounded = rounded + 0.0  # -0.0 (a small negative rounded away) reads 0.0
        if out is frame:
            out = frame.copy()
        out.isetitem(position, rounded.astype(series.dtype))
    return out
