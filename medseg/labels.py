"""Label files -> binary lesion masks: the value rules of ``data.labels`` (``LabelConfig``).

Used by the MONAI transforms (``MapLabelsd``), the statistics, the fingerprint and evaluation;
kept out of :mod:`medseg.io` so reading volumes does not depend on the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import LabelConfig
from medseg.errors import ConfigError, InputFileError, MedsegError
from medseg.io import Volume, read_volume


def map_labels(array: np.ndarray, cfg: LabelConfig, path: str | Path, n_voxels: int | None = None) -> np.ndarray:
    """Map a raw label array (I, J, K) to the uint8 binary lesion mask (0/1) per ``cfg``.

    Raises ``InputFileError`` for non-integer values, values outside ``cfg.allowed_values``, and
    negative values not listed in ``cfg.allowed_values`` or ``cfg.foreground`` (``nonzero`` would
    silently make them background; a negative value usually means a signed/unsigned mix-up);
    and for a label that is implausible as a lesion mask (:func:`check_distinct_values`,
    :func:`check_foreground_fraction`). ``n_voxels``: the whole volume's voxel count when
    ``array`` is a crop of it holding every non-zero voxel (the foreground share is of the volume).
    """
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputFileError(path, "label contains NaN/Inf values")
        if not np.array_equal(array, np.round(array)):
            raise InputFileError(path, "label has non-integer values (an interpolated mask?); labels must be integer-valued")
    check_distinct_values(array, cfg, path)
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
    check_foreground_fraction(mask, cfg, path, n_voxels)
    return mask.view(np.uint8)  # bool -> uint8 0/1 without a copy


def check_distinct_values(array: np.ndarray, cfg: LabelConfig, path: str | Path) -> None:
    """Raise ``InputFileError`` when ``array`` (integer-valued) holds more distinct values than
    ``cfg.max_distinct_values``: an image (an MR T1 holds hundreds) given as the label.

    Skipped with ``cfg.allowed_values`` (which names every value itself) or
    ``max_distinct_values`` None. Costs a min/max unless the value range is wider than the bound."""
    bound = cfg.max_distinct_values
    if bound is None or cfg.allowed_values is not None or not array.size:
        return
    if float(array.max()) - float(array.min()) < bound:  # at most ``bound`` integers fit in the range
        return
    n = len(present_values(array))
    if n > bound:
        raise InputFileError(
            path,
            f"label has {n} distinct values (more than data.labels.max_distinct_values = {bound}): it looks like an "
            "image, not a label; give the lesion mask, or (if the values are meant) list them in "
            "data.labels.allowed_values or raise data.labels.max_distinct_values (null to switch the check off)",
        )


def check_foreground_fraction(mask: np.ndarray, cfg: LabelConfig, path: str | Path, n_voxels: int | None = None) -> None:
    """Raise ``InputFileError`` when the lesion ``mask`` (bool) covers more than
    ``cfg.max_foreground_fraction`` of the volume (``n_voxels`` voxels, default ``mask.size``):
    an image given as the label (an MR T1 becomes one "lesion" of almost the whole volume), or
    an inverted mask. Skipped with ``max_foreground_fraction`` None."""
    limit = cfg.max_foreground_fraction
    total = mask.size if n_voxels is None else n_voxels
    if limit is None or not total:
        return
    fraction = np.count_nonzero(mask) / total
    if fraction > limit:
        raise InputFileError(
            path,
            f"label foreground covers {fraction:.2%} of the volume (more than data.labels.max_foreground_fraction = "
            f"{limit:g}): an image or an inverted mask given as the label? Give the lesion mask, or raise "
            "data.labels.max_foreground_fraction (null to switch the check off) if it is meant",
        )


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


def require_foreground(label_paths: Sequence[str | Path], n_lesion_voxels: int, cfg: LabelConfig, what: str) -> None:
    """Refuse a set of labels in which ``cfg.foreground`` marks no voxel at all.

    ``n_lesion_voxels``: lesion voxels the caller found in the mapped masks of ``label_paths``
    (its statistics or training volumes); nothing is read when it is positive. Otherwise the
    raw values of every label are read and, when none of them is a foreground value (a value
    list such as ``[3]`` on BraTS, whose labels hold 0, 1, 2, 4; or only zeros with
    ``nonzero``), a ``ConfigError`` names the values that do occur: every mask would be empty
    and the statistics, the curve and any training all-zero. ``what`` names the set in the
    message ("training", "manifest"). Unreadable labels are skipped (their cases fail on their
    own); when the foreground values occur, nothing is raised (the lesions were lost later, e.g.
    outside the foreground crop, which is not a label-value problem).
    """
    if n_lesion_voxels > 0 or not label_paths:
        return
    present: set[int] = set()
    for path in label_paths:
        try:
            present.update(present_values(read_volume(path).array))
        except MedsegError:
            continue
    positive = sorted(v for v in present if v > 0)
    found = positive if cfg.foreground == "nonzero" else [v for v in cfg.foreground if v in present]
    if found or not present:
        return
    values = ", ".join(str(v) for v in sorted(present))
    n = f"{len(label_paths)} {what} label(s)"
    if not positive:
        raise ConfigError(f"data.labels.foreground {_shown(cfg.foreground)}: none of the {n} holds a lesion voxel; "
                          f"the values they hold: {values} (no lesion anywhere: check the label files)")
    fix = f"--set data.labels.foreground=[{','.join(str(v) for v in positive)}] or nonzero"
    raise ConfigError(f"data.labels.foreground {_shown(cfg.foreground)} occurs in none of the {n}; the values they "
                      f"hold: {values}; set data.labels.foreground to some of these ({fix})")


def _shown(foreground: str | list[int]) -> str:
    return foreground if isinstance(foreground, str) else "[" + ", ".join(str(v) for v in foreground) + "]"


def require_listed_foreground(stats_cases: Any, cases: Sequence[Any], cfg: LabelConfig, what: str) -> None:
    """:func:`require_foreground` for lesion statistics (``stats_cases``: the per-case table,
    ``case_id`` and ``lesion_voxels``, of the ``cases`` measured): only for a listed foreground
    (``[3]``), since labels holding only zeros under ``nonzero`` are a lesion-free cohort, not
    a wrong setting."""
    if cfg.foreground == "nonzero" or not len(stats_cases):
        return
    done = set(stats_cases["case_id"])
    require_foreground([c.label for c in cases if c.case_id in done and c.label is not None],
                       int(stats_cases["lesion_voxels"].sum()), cfg, what)

