"""Read a DICOM Segmentation onto an image grid: the labels of a SEG that references a series.

highdicom decodes the frames and interprets every SegmentationType: BINARY (one segment per
frame), FRACTIONAL (a probability per pixel, counted at >= half the maximum) and LABELMAP (DICOM
2024: one frame holds the numbers of several segments as pixel values). medseg checks the
geometry itself first, frame by frame: its orientation must be the grid's (I, J) plane and its
Plane Position (Patient) a voxel of the grid, all frames on one (i, j) start, so labels land
exactly on the image voxels, never resampled; a SEG on another grid (other orientation, pixel
spacing or a shifted lattice) is refused with the reason. The frames may skip any slices:
highdicom stacks them at the grid's slice spacing (a SEG often omits empty frames, and many SEGs
carry no Spacing Between Slices).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medseg.dicom.series import GRID_TOLERANCE_VOXELS, grid_index, integer_index, orientation_problem
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
    import highdicom as hd

    path = Path(path)
    pattern = compile_select(segments, path)
    ds = read_label_object(path, "SEG", "a DICOM Segmentation")
    if "SegmentSequence" not in ds:
        raise InputFileError(path, f"not a DICOM Segmentation (Modality {getattr(ds, 'Modality', None)!r})")
    try:
        defined = segment_labels(ds)
        # a LABELMAP's background value (Pixel Padding Value) may have a segment item ("Background")
        background = int(ds.PixelPaddingValue) if "PixelPaddingValue" in ds else None
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputFileError(path, f"malformed SEG header ({exc})") from None
    labels = {n: lab for n, lab in defined.items() if n != background}
    chosen = {n: lab for n, lab in labels.items() if pattern is None or pattern.search(lab)}
    if not chosen:
        raise InputFileError(path, f"no segment label matches {segments!r} (labels: {sorted(labels.values())})")
    if n_frames < 1 or rows < 1 or cols < 1:
        raise InputFileError(path, f"malformed SEG: {n_frames} frame(s) of {rows} x {cols}")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != n_frames:
        raise InputFileError(path, f"NumberOfFrames is {n_frames} but the per-frame functional groups describe "
                                   f"{len(per_frame)} frame(s); the SEG is damaged or was edited")  # fmt: skip
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    expected = -(-n_frames * rows * cols * bits // 8)  # native pixel data, padded to an even length
    if (syntax is None or not syntax.is_encapsulated) and len(ds.get("PixelData", b"")) not in (expected, expected + 1):
        raise InputFileError(path, f"the pixel data holds {len(ds.get('PixelData', b''))} byte(s), not the "
                                   f"{expected} of NumberOfFrames x Rows x Columns = {n_frames} x {rows} x {cols} "
                                   f"at {bits} bit(s); the SEG is damaged or was edited")  # fmt: skip
    labelmap = str(getattr(ds, "SegmentationType", "")) == "LABELMAP"
    first = _check_frame(ds, 0, path, geometry, defined, labelmap)
    for f in range(1, n_frames):
        start = _check_frame(ds, f, path, geometry, defined, labelmap)
        if tuple(start[:2]) != tuple(first[:2]):
            raise InputFileError(path, f"frame {f + 1} starts at voxel (i, j) = {tuple(start[:2].tolist())}, frame 1 "
                                       f"at {tuple(first[:2].tolist())}: the frames are not one stack")  # fmt: skip
    for item in [*ds.get("SharedFunctionalGroupsSequence", []), *(per_frame or [])]:
        for measures in item.get("PixelMeasuresSequence", []):  # stack the frames at the grid's spacing
            measures.SpacingBetweenSlices = f"{geometry.spacing[2]:.10g}"
    mask = np.zeros(geometry.size, dtype=np.uint8)
    numbers = sorted(chosen)
    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
        if seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL:
            for number in numbers:  # one float volume at a time
                volume = seg.get_volume(segment_numbers=[number])
                _place(mask, volume.array[..., 0] >= 0.5, volume.affine, geometry, path)
        else:  # BINARY and LABELMAP: 1..len(numbers) where a chosen segment is, 0 elsewhere
            volume = seg.get_volume(segment_numbers=numbers, combine_segments=True, relabel=True,
                                    skip_overlap_checks=True)  # fmt: skip
            _place(mask, volume.array > 0, volume.affine, geometry, path)
    except InputFileError:
        raise
    except Exception as exc:  # highdicom raises several types for frames it cannot decode or stack
        raise InputFileError(path, f"cannot read the SEG frames ({type(exc).__name__}: {exc})") from None
    return mask, sorted(chosen.values())


def _check_frame(ds, f: int, path: Path, geometry: Geometry, labels: dict[int, str], labelmap: bool) -> np.ndarray:
    """The (i, j, k) voxel of frame ``f``'s first pixel. Refuses the frame unless it names a
    defined segment (not in a LABELMAP, whose pixel values do) and lies on ``geometry``: the
    grid's (I, J) orientation, its first pixel a voxel."""
    if not labelmap:
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
    return start


def _place(mask: np.ndarray, inside: np.ndarray, affine: np.ndarray, geometry: Geometry, path: Path) -> None:
    """OR ``inside`` (highdicom's (slices, rows, columns) volume, ``affine``: those indices -> LPS mm)
    into the (I, J, K) ``mask``: a column is one I step, a row one J step, a slice one K step."""
    steps = grid_index(geometry, affine[:3, :3].T + np.asarray(geometry.origin)).T  # (i, j, k) of one index step
    sign = 1 if steps[2, 0] > 0 else -1  # highdicom stacks along the plane normal, the grid's K may run against it
    if np.abs(steps[:, 1:] - [[0, 1], [1, 0], [0, 0]]).max() > GRID_TOLERANCE_VOXELS:
        raise InputFileError(path, f"the SEG's pixel spacing (one column, one row = {np.round(steps[:, 2], 4).tolist()}, "
                                   f"{np.round(steps[:, 1], 4).tolist()} voxels) is not the image grid's")  # fmt: skip
    if abs(abs(steps[2, 0]) - 1) > 1e-2:  # stacked at the grid's slice spacing (read_dicom_seg sets it)
        raise InputFileError(path, f"the SEG's frames stack {steps[2, 0]:.4f} slices apart, not one")
    i0, j0, k0 = (int(v) for v in integer_index(grid_index(geometry, affine[None, :3, 3])[0]))
    n_slices, n_rows, n_cols = inside.shape
    for s in np.flatnonzero(inside.reshape(n_slices, -1).any(axis=1)):
        k = k0 + sign * int(s)
        if not (0 <= k < geometry.size[2] and 0 <= i0 and 0 <= j0 and i0 + n_cols <= geometry.size[0]
                and j0 + n_rows <= geometry.size[1]):
            raise InputFileError(path, f"a frame at slice k = {k} lies outside the image grid {geometry.size}")
        mask[i0:i0 + n_cols, j0:j0 + n_rows, k] |= inside[s].T.astype(np.uint8)


def read_label_object(path: Path, modality: str, what: str):
    """The DICOM label object at ``path`` (pydicom dataset) when its Modality is ``modality``;
    a file pydicom cannot read, or another modality, is an ``InputFileError`` naming ``path``
    and, for the second, ``what`` was expected."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises several types for damaged files
        raise InputFileError(path, f"cannot read DICOM ({exc})") from None
    if str(getattr(ds, "Modality", "")) != modality:
        raise InputFileError(path, f"not {what} (Modality {getattr(ds, 'Modality', None)!r})")
    return ds


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
