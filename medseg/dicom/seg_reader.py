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
    """Segment number -> label of a SEG dataset."""
    return {int(item.SegmentNumber): str(getattr(item, "SegmentLabel", "")) for item in ds.SegmentSequence}


def read_dicom_seg(path: str | Path, geometry: Geometry, segments: str | None = None) -> tuple[np.ndarray, list[str]]:
    """The union of the selected segments of the SEG at ``path`` as a uint8 (I, J, K) mask on
    ``geometry`` (1 = in a segment), and the labels of the segments used.

    ``segments``: regular expression matched (case-insensitive, anywhere) against segment labels;
    ``None`` = every segment. FRACTIONAL SEGs count a voxel at >= half the maximum value.
    Raises ``InputFileError`` naming the file for anything that does not fit the grid.
    """
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises several types for damaged files
        raise InputFileError(path, f"cannot read DICOM ({exc})") from None
    if str(getattr(ds, "Modality", "")) != "SEG" or "SegmentSequence" not in ds:
        raise InputFileError(path, f"not a DICOM Segmentation (Modality {getattr(ds, 'Modality', None)!r})")
    labels = segment_labels(ds)
    chosen = {n: lab for n, lab in labels.items() if segments is None or re.search(segments, lab, re.IGNORECASE)}
    if not chosen:
        raise InputFileError(path, f"no segment label matches {segments!r} (labels: {sorted(labels.values())})")
    try:
        frames = ds.pixel_array
    except Exception as exc:
        raise InputFileError(path, f"cannot decode the SEG frames ({exc})") from None
    n_frames = int(getattr(ds, "NumberOfFrames", 1))
    frames = frames.reshape(n_frames, int(ds.Rows), int(ds.Columns))
    if str(getattr(ds, "SegmentationType", "BINARY")) == "FRACTIONAL":
        frames = frames >= (int(getattr(ds, "MaximumFractionalValue", 255)) + 1) // 2
    else:
        frames = frames > 0
    mask = np.zeros(geometry.size, dtype=np.uint8)
    rows, cols = int(ds.Rows), int(ds.Columns)
    for f in range(n_frames):
        identification = _frame_item(ds, f, "SegmentIdentificationSequence")
        if identification is None:
            raise InputFileError(path, f"frame {f + 1} names no segment")
        if int(identification.ReferencedSegmentNumber) not in chosen or not frames[f].any():
            continue
        plane = _frame_item(ds, f, "PlanePositionSequence")
        orientation = _frame_item(ds, f, "PlaneOrientationSequence")
        if plane is None or orientation is None:
            raise InputFileError(path, f"frame {f + 1} has no plane position/orientation")
        problem = orientation_problem(geometry, [float(v) for v in orientation.ImageOrientationPatient])
        if problem:
            raise InputFileError(path, f"frame {f + 1} does not lie on the image grid: {problem}")
        start = integer_index(grid_index(geometry, np.asarray([[float(v) for v in plane.ImagePositionPatient]]))[0])
        if start is None:
            raise InputFileError(path, f"frame {f + 1} position {list(map(float, plane.ImagePositionPatient))} is not "
                                       "a voxel of the image grid (other spacing or a shifted lattice)")
        i0, j0, k = (int(v) for v in start)
        if not (0 <= k < geometry.size[2] and 0 <= i0 and 0 <= j0 and i0 + cols <= geometry.size[0]
                and j0 + rows <= geometry.size[1]):
            raise InputFileError(path, f"frame {f + 1} lies outside the image grid {geometry.size}")
        mask[i0:i0 + cols, j0:j0 + rows, k] |= frames[f].T.astype(np.uint8)
    return mask, sorted(chosen.values())


def referenced_series(ds) -> list[str]:
    """SeriesInstanceUIDs a SEG references (Referenced Series Sequence)."""
    return [str(item.SeriesInstanceUID) for item in getattr(ds, "ReferencedSeriesSequence", []) if "SeriesInstanceUID" in item]
