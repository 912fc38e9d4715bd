"""Read a DICOM Segmentation onto an image grid: the labels of a SEG that references a series.

Every frame is placed by its own Plane Position (Patient) on the image grid (the grid medseg
reads the referenced series onto): its orientation must be the grid's (I, J) plane and its
position a voxel of the grid, so labels land exactly on the image voxels, never resampled. A SEG
on another grid (other orientation, spacing or a shifted lattice) is refused with the reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medseg.dicom.series import grid_index, integer_index, orientation_problem
from medseg.errors import InputFileError
from medseg.io import Geometry


def _frame_item(ds, index: int, name: str):
    """Functional-group item ``name`` of frame ``index`` (per-frame first, then shared)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and index < len(per_frame) and name in per_frame[index]:
        return per_frame[index][name].value[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and name in shared[0]:
        return shared[0][name].value[0]
    return None


def segment_labels(ds) -> dict[int, str]:
    """Segment number -> label of a SEG dataset. Raises ``ValueError`` for an item without a
    (numeric) Segment Number."""
    labels = {}
    for n, item in enumerate(ds.SegmentSequence, start=1):
        if "SegmentNumber" not in item:
            raise ValueError(f"Segment Sequence item {n} has no Segment Number")
        labels[int(item.SegmentNumber)] = str(getattr(item, "SegmentLabel", ""))
    return labels


def read_dicom_seg(path: str | Path, geometry: Geometry, segments: str | None = None) -> tuple[np.ndarray, list[str]]:
    """The union of the selected segments of the SEG at ``path`` as a uint8 (I, J, K) mask on
    ``geometry`` (1 = in a segment), and the labels of the segments used.

    ``segments``: regular expression matched (case-insensitive, anywhere) against segment labels;
    ``None`` = every segment. FRACTIONAL SEGs count a voxel at >= half the maximum value.
    Raises ``InputFileError`` naming the file for anything that does not fit the grid, and for a
    malformed SEG (frames that name no segment, a NumberOfFrames that disagrees with the pixel
    data or the per-frame functional groups).
    """
    import pydicom

    path = Path(path)
    pattern = compile_select(segments, path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises several types for damaged files
        raise InputFileError(path, f"cannot read DICOM ({exc})") from None
    if str(getattr(ds, "Modality", "")) != "SEG" or "SegmentSequence" not in ds:
        raise InputFileError(path, f"not a DICOM Segmentation (Modality {getattr(ds, 'Modality', None)!r})")
    try:
        labels = segment_labels(ds)
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputFileError(path, f"malformed SEG header ({exc})") from None
    chosen = {n: lab for n, lab in labels.items() if pattern is None or pattern.search(lab)}
    if not chosen:
        raise InputFileError(path, f"no segment label matches {segments!r} (labels: {sorted(labels.values())})")
    if n_frames < 1 or rows < 1 or cols < 1:
        raise InputFileError(path, f"malformed SEG: {n_frames} frame(s) of {rows} x {cols}")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != n_frames:
        raise InputFileError(path, f"NumberOfFrames is {n_frames} but the per-frame functional groups describe "
                                   f"{len(per_frame)} frame(s); the SEG is damaged or was edited")  # fmt: skip
    try:
        frames = ds.pixel_array
    except Exception as exc:
        raise InputFileError(path, f"cannot decode the SEG frames ({exc})") from None
    if frames.size != n_frames * rows * cols:
        raise InputFileError(path, f"the pixel data holds {frames.size} value(s), not NumberOfFrames x Rows x Columns "
                                   f"= {n_frames} x {rows} x {cols}; the SEG is damaged or was edited")  # fmt: skip
    frames = frames.reshape(n_frames, rows, cols)
    if str(getattr(ds, "SegmentationType", "BINARY")) == "FRACTIONAL":
        frames = frames >= (int(getattr(ds, "MaximumFractionalValue", 255)) + 1) // 2
    else:
        frames = frames > 0
    mask = np.zeros(geometry.size, dtype=np.uint8)
    for f in range(n_frames):
        identification = _frame_item(ds, f, "SegmentIdentificationSequence")
        if identification is None or "ReferencedSegmentNumber" not in identification:
            raise InputFileError(path, f"frame {f + 1} names no segment (no Referenced Segment Number in its "
                                       "functional groups)")  # fmt: skip
        try:
            number = int(identification.ReferencedSegmentNumber)
        except (TypeError, ValueError):
            raise InputFileError(path, f"frame {f + 1}: Referenced Segment Number "
                                       f"{identification.ReferencedSegmentNumber!r} is not a number") from None
        if number not in labels:
            raise InputFileError(path, f"frame {f + 1} names segment {number}, which the Segment Sequence does not "
                                       f"define (segments {sorted(labels)})")  # fmt: skip
        if number not in chosen or not frames[f].any():
            continue
        plane = _frame_item(ds, f, "PlanePositionSequence")
        orientation = _frame_item(ds, f, "PlaneOrientationSequence")
        if plane is None or orientation is None or "ImagePositionPatient" not in plane \
                or "ImageOrientationPatient" not in orientation:
            raise InputFileError(path, f"frame {f + 1} has no plane position/orientation")
        try:
            direction = [float(v) for v in orientation.ImageOrientationPatient]
            position = [float(v) for v in plane.ImagePositionPatient]
        except (TypeError, ValueError):
            raise InputFileError(path, f"frame {f + 1}: plane position/orientation is not numbers") from None
        if len(direction) != 6 or len(position) != 3 or not np.isfinite([*direction, *position]).all():
            raise InputFileError(path, f"frame {f + 1}: plane position {position} / orientation {direction} is not "
                                       "3 / 6 finite numbers")  # fmt: skip
        problem = orientation_problem(geometry, direction)
        if problem:
            raise InputFileError(path, f"frame {f + 1} does not lie on the image grid: {problem}")
        start = integer_index(grid_index(geometry, np.asarray([position]))[0])
        if start is None:
            raise InputFileError(path, f"frame {f + 1} position {position} is not "
                                       "a voxel of the image grid (other spacing or a shifted lattice)")
        i0, j0, k = (int(v) for v in start)
        if not (0 <= k < geometry.size[2] and 0 <= i0 and 0 <= j0 and i0 + cols <= geometry.size[0]
                and j0 + rows <= geometry.size[1]):
            raise InputFileError(path, f"frame {f + 1} lies outside the image grid {geometry.size}")
        mask[i0:i0 + cols, j0:j0 + rows, k] |= frames[f].T.astype(np.uint8)
    return mask, sorted(chosen.values())


def compile_select(pattern: str | None, path: Path) -> re.Pattern[str] | None:
    """A ``--select`` pattern (segment labels / ROI names) compiled case-insensitive (``None``
    stays ``None``); a bad one is refused naming itself and the label object ``path``."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise InputFileError(path, f"--select {pattern!r} is not a valid regular expression ({exc})") from None


def referenced_series(ds) -> list[str]:
    """SeriesInstanceUIDs a SEG references (Referenced Series Sequence)."""
    return [str(item.SeriesInstanceUID) for item in getattr(ds, "ReferencedSeriesSequence", []) if "SeriesInstanceUID" in item]
