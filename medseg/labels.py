"""Label files -> binary lesion masks: the value rules of ``data.labels`` (``LabelConfig``).

Used by the MONAI transforms (``MapLabelsd``), the statistics, the fingerprint and evaluation;
kept out of :mod:`medseg.io` so reading volumes does not depend on the config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.config import LabelConfig
from medseg.errors import InputFileError
from medseg.io import Volume, read_volume


def map_labels(array: np.ndarray, cfg: LabelConfig, path: str | Path) -> np.ndarray:
    """Map a raw label array (I, J, K) to the uint8 binary lesion mask (0/1) per ``cfg``.

    Raises ``InputFileError`` for non-integer values, values outside ``cfg.allowed_values``, and
    negative values not listed in ``cfg.allowed_values`` or ``cfg.foreground`` (``nonzero`` would
    silently make them background; a negative value usually means a signed/unsigned mix-up).
    """
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputFileError(path, "label contains NaN/Inf values")
        if not np.array_equal(array, np.round(array)):
            raise InputFileError(path, "label has non-integer values (an interpolated mask?); labels must be integer-valued")
    if array.dtype.kind in "if" and array.size and array.min() < 0:
        listed = set(cfg.allowed_values or ()) | set(cfg.foreground if cfg.foreground != "nonzero" else ())
        negative = [v for v in present_values(array) if v < 0 and v not in listed]
        if negative:
            raise InputFileError(
                path,
                f"label has negative value(s) {negative[:10]}; list them in data.labels.allowed_values "
                "(or data.labels.foreground) if they are meant, otherwise fix the file (0 = background)",
            )
    if cfg.allowed_values is not None:
        present = present_values(array)
        unexpected = sorted(set(present) - set(cfg.allowed_values))
        if unexpected:
            raise InputFileError(
                path,
                f"unexpected label value(s) {unexpected[:10]} (allowed: {sorted(cfg.allowed_values)}); "
                "set data.labels.allowed_values / foreground in the config",
            )
    if cfg.foreground == "nonzero":
        mask = array > 0
    else:
        mask = np.isin(array, np.asarray(cfg.foreground, dtype=array.dtype if array.dtype.kind in "iu" else np.float64))
    return mask.view(np.uint8)  # bool -> uint8 0/1 without a copy


def present_values(array: np.ndarray) -> list[int]:
    """Distinct integer values of a label array; bincount when the range is small (fast)."""
    lo, hi = int(array.min()), int(array.max())
    if array.dtype.kind in "iub" and hi - lo < 1 << 16:
        counts = np.bincount((array.ravel() - lo).astype(np.int64, copy=False) if lo else array.ravel().astype(np.intp, copy=False), minlength=1)
        return [int(v) + lo for v in np.flatnonzero(counts)]
    return [int(v) for v in np.unique(array)]


def read_label(path: str | Path, cfg: LabelConfig | None = None) -> Volume:
    """Read a label file and map it to a uint8 binary lesion mask (0/1), shape (I, J, K)."""
    volume = read_volume(path)
    mask = map_labels(volume.array, cfg or LabelConfig(), volume.path)
    return Volume(array=mask, geometry=volume.geometry, path=volume.path, meta={"raw_values": None})
