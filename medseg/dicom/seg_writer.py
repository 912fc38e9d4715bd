"""Write a mask on a DICOM series' grid as a DICOM Segmentation (highdicom).

The SEG references its source series (study, series and frame-of-reference UIDs; one frame per
source instance, its plane position copied from that instance), copies the source's patient and
study attributes (it goes back to the same patient), and identifies the algorithm (medseg
version, checkpoint sha256). BINARY by default, FRACTIONAL (8-bit probability) on request.
Written atomically (temporary file + rename).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg import __version__
from medseg.atomic import atomic_path
from medseg.config import CodeConfig, DicomSegConfig
from medseg.dicom.series import place_instances
from medseg.errors import InputFileError, MedsegError, OutputError
from medseg.io import Geometry

# segments one SEG may hold: the SEG stores one binary plane per segment and frame, so the memory
# is the mask's voxels x segments; more distinct values than this is an intensity image, not labels
MAX_SEGMENTS = 255


def check_segment_count(n_segments: int, what: str) -> None:
    """Refuse (one line naming ``what``) a SEG of more than :data:`MAX_SEGMENTS` segments, before
    anything of that size is allocated."""
    if n_segments > MAX_SEGMENTS:
        raise MedsegError(f"{what}: {n_segments} segments asked for; a DICOM SEG of medseg holds at most "
                          f"{MAX_SEGMENTS} (one per distinct label value) -- is it a label map?")


@dataclass
class Algorithm:
    """What made the segmentation (DICOM Segment Algorithm Identification)."""

    name: str = "medseg"
    version: str = __version__
    parameters: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_checkpoints(cls, sha256: Sequence[str]) -> Algorithm:
        """medseg with the sha256 of each checkpoint (an ensemble lists all, comma-separated)."""
        return cls(parameters={"checkpoint_sha256": ",".join(sha256)} if sha256 else {})


NEW_FOR_NOTE = " (new frame of ref.)"
MISSING_FOR_MESSAGE = ("series has no Frame of Reference UID, so a DICOM SEG cannot reference its space; set "
                       "inference.dicom_seg.missing_frame_of_reference=new to give the SEG a new one, or "
                       "output_format=nifti")


def missing_frame_of_reference(dataset: object) -> bool:
    """True when an instance header has no (or an empty) Frame of Reference UID."""
    return not str(getattr(dataset, "FrameOfReferenceUID", "") or "").strip()


def with_new_frame_of_reference(datasets: Sequence[object]) -> list[object]:
    """Copies of the series' instance headers (no pixel data) sharing one new Frame of Reference
    UID, derived from their SeriesInstanceUID so every run gives the same one."""
    import copy

    from pydicom.uid import generate_uid

    series_uid = str(getattr(datasets[0], "SeriesInstanceUID", ""))
    uid = generate_uid(entropy_srcs=["medseg frame of reference", series_uid])
    out = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        ds.FrameOfReferenceUID = uid
        out.append(ds)
    return out


def _code(code: CodeConfig):  # -> highdicom CodedConcept
    import highdicom as hd

    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _segment_descriptions(settings: DicomSegConfig, classes: Sequence[int], algorithm: Algorithm) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, family=codes.DCM.ArtificialIntelligence, version=algorithm.version,
        parameters=algorithm.parameters or None,
    )
    out = []
    for number, value in enumerate(classes, start=1):
        label = settings.segment_label if len(classes) == 1 else f"{settings.segment_label} class {value}"
        out.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=_code(settings.category),
            segmented_property_type=_code(settings.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=identification,
        ))
    return out


def _segment_numbers(frames: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """uint8 label map: the segment number (1-based position in sorted ``classes``) of each voxel
    whose value is one of ``classes``, 0 elsewhere (at most :data:`MAX_SEGMENTS` classes)."""
    values = np.asarray(classes, dtype=np.int64)
    flat = frames.astype(np.int64, copy=False)
    index = np.searchsorted(values, flat)
    hit = values[np.minimum(index, len(values) - 1)] == flat
    return np.where(hit, index + 1, 0).astype(np.uint8)


def write_dicom_seg(
    mask: np.ndarray,
    geometry: Geometry,
    source: str | Path,
    out_path: str | Path,
    settings: DicomSegConfig | None = None,
    algorithm: Algorithm | None = None,
    probability: np.ndarray | None = None,
    n_classes: int = 1,
    classes: Sequence[int] | None = None,
) -> Path:
    """Write ``mask`` (I, J, K) on ``geometry`` -- the grid medseg read the DICOM series folder
    ``source`` onto -- as a DICOM SEG at ``out_path``.

    ``mask``: 0 background, 1..``n_classes`` foreground classes (one segment each).
    ``classes``: the label values to write instead, one segment each (``export-seg
    --multi-class``: the distinct values present, never every value up to the largest); at most
    :data:`MAX_SEGMENTS` segments, checked before the frames are allocated.
    ``probability``: (I, J, K) lesion probability in [0, 1]; required when
    ``settings.fractional`` (binary models only). Raises ``InputFileError`` naming the source
    when its instances are not the grid's slices, ``OutputError`` when writing fails.
    """
    import highdicom as hd
    import pydicom

    settings = settings or DicomSegConfig()
    algorithm = algorithm or Algorithm()
    source = Path(source)
    if tuple(mask.shape) != tuple(geometry.size):
        raise MedsegError(f"mask shape {mask.shape} is not the grid's {geometry.size}")
    given = classes
    if given is None:
        check_segment_count(n_classes, f"mask for {source}")
        classes = list(range(1, n_classes + 1))
    else:
        check_segment_count(len(given), f"mask for {source}")
        classes = sorted({int(c) for c in given})
        if not classes or classes[0] < 1:
            raise MedsegError(f"segment values {classes[:10]} must be label values >= 1")
    n_classes = len(classes)
    placed = place_instances(source, geometry)
    datasets = [p.dataset for p in placed]
    if len({str(getattr(ds, "SeriesInstanceUID", "")) for ds in datasets}) != 1:
        raise InputFileError(source, "instances belong to more than one series")
    if settings.fractional:
        if n_classes != 1:
            raise MedsegError("dicom_seg.fractional needs a binary model (one lesion class)")
        if probability is None:
            raise MedsegError("dicom_seg.fractional needs the probability map")
        # (K, rows, cols) = (K, J, I) frames in the order of ``placed`` (k = 0..K-1)
        pixels = np.clip(np.transpose(probability, (2, 1, 0)), 0.0, 1.0).astype(np.float32)
        seg_type = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        frames = np.transpose(mask, (2, 1, 0))
        if given is None and n_classes == 1:
            pixels = (frames > 0).astype(np.uint8)
        else:  # a (K, rows, cols) label map of segment numbers: one byte per voxel, whatever the count
            pixels = _segment_numbers(frames, classes)
        seg_type = hd.seg.SegmentationTypeValues.BINARY
    any_foreground = bool(np.any(pixels))
    description = settings.series_description
    if missing_frame_of_reference(datasets[0]):
        if settings.missing_frame_of_reference != "new":
            raise InputFileError(source, MISSING_FOR_MESSAGE)
        datasets = with_new_frame_of_reference(datasets)
        description = (description[: 64 - len(NEW_FOR_NOTE)] + NEW_FOR_NOTE)
    try:
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=np.ascontiguousarray(pixels),
            segmentation_type=seg_type,
            segment_descriptions=_segment_descriptions(settings, classes, algorithm),
            series_instance_uid=hd.UID(),
            series_number=settings.series_number,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="medseg",
            manufacturer_model_name="medseg",
            software_versions=algorithm.version,
            device_serial_number="none",
            content_label="LESIONS",
            content_description=description[:64] or None,
            omit_empty_frames=any_foreground,  # an empty mask still needs one frame per slice
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise InputFileError(source, f"cannot make a DICOM SEG for this series ({exc})") from None
    seg.SeriesDescription = description
    out = Path(out_path)
    try:
        with atomic_path(out) as tmp:
            pydicom.dcmwrite(tmp, seg, enforce_file_format=True)
    except OSError as exc:
        raise OutputError(out, f"cannot write DICOM SEG ({exc.strerror or exc})") from None
    return out
