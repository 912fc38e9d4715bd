"""Preflight: every case checked for what its outputs need before any inference runs.

A batch of hospital studies can take minutes per case; a case that cannot give its outputs
must say so before that time is spent, with the fix. :func:`preflight` reads only headers
(one DICOM header per series, the image information of other files) and sets
``InferenceCase.problem`` for:

- a single DICOM file given as a volume (one slice; the series' folder is needed);
- a DICOM series whose Modality is not the model's (``--input`` paths and manifest rows alike;
  a manifest's ``modality`` column is checked when the rows are read);
- channels on different grids (size, spacing, origin, direction of the image headers);
- DICOM SEG output (``inference.output_format`` dicom-seg / both) for a case whose first channel
  is not a DICOM series, or whose series has no Frame of Reference UID while
  ``inference.dicom_seg.missing_frame_of_reference`` is ``refuse``.

A case whose files cannot even be opened is left to the reader, which names the file and the
problem when the case is read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.config import InferenceConfig
from medseg.errors import MedsegError, printable_path
from medseg.geometry import grid_mismatch
from medseg.inference.cases import InferenceCase
from medseg.io import Geometry
from medseg.outputs import FAILURES_FILE

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Header:
    """What preflight knows of one channel without reading its voxels. ``grid``: its voxel grid
    from the header, or None when unknown; ``modality`` and ``frame_of_reference`` for DICOM."""

    path: Path
    dicom: bool
    grid: Geometry | None = None
    modality: str | None = None
    frame_of_reference: str | None = None


def is_dicom_file(path: Path) -> bool:
    """True for a file with the DICOM preamble (``DICM`` at byte 128) or a ``.dcm`` name."""
    if path.name.lower().endswith((".dcm", ".dicom", ".ima")):
        return True
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: Path) -> Header:
    """The header facts of one channel (module docstring). Raises ``MedsegError`` naming the file
    when the header cannot be read."""
    if path.is_dir():
        return _dicom_folder_header(path)
    import SimpleITK as sitk

    from medseg.io import itk_path, preserve_locale

    reader = sitk.ImageFileReader()
    try:
        with itk_path(path) as plain, preserve_locale():
            reader.SetFileName(str(plain))
            reader.ReadImageInformation()
    except RuntimeError:
        return Header(path, dicom=False)  # the reader names the problem when the case is read
    size = tuple(int(v) for v in reader.GetSize())
    if len(size) != 3:
        return Header(path, dicom=False)
    grid = Geometry(size, tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection()))  # type: ignore[arg-type]
    return Header(path, dicom=False, grid=grid)


def _dicom_folder_header(folder: Path) -> Header:
    import pydicom

    from medseg.errors import InputFileError
    from medseg.io import dicom_series_files

    try:
        files = dicom_series_files(folder)
    except InputFileError:
        return Header(folder, dicom=True)  # no series: the reader says so when the case is read
    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    except Exception as exc:  # pydicom raises several types for damaged files
        raise MedsegError(f"{printable_path(files[0])}: cannot read DICOM header ({exc})") from None
    modality = str(getattr(ds, "Modality", "") or "").strip().upper() or None
    frame = str(getattr(ds, "FrameOfReferenceUID", "") or "").strip() or None
    return Header(folder, dicom=True, modality=modality, frame_of_reference=frame)


def _grid_problem(headers: Sequence[Header]) -> str | None:
    """Why the channels' header grids differ (the reader's rule, :func:`medseg.geometry.grid_mismatch`),
    or None."""
    known = [(h.path, h.grid) for h in headers if h.grid is not None]
    for path, grid in known[1:]:
        first_path, first = known[0]
        problem = grid_mismatch(first.size, first.affine, grid.size, grid.affine)
        if problem is not None:
            return (f"channels are on different grids ({problem}): {printable_path(first_path)} is {first.size} "
                    f"voxels of {_mm(first.spacing)} mm at {_mm(first.origin)}, {printable_path(path)} is {grid.size} "
                    f"of {_mm(grid.spacing)} mm at {_mm(grid.origin)}; resample them onto one grid first")
    return None


def _mm(values: Sequence[float]) -> list[float]:
    return [round(float(v), 3) for v in values]


def case_problem(case: InferenceCase, channels: Sequence[str], modality: str, cfg: InferenceConfig) -> str | None:
    """Why ``case`` cannot give its outputs (module docstring), or None. May set
    ``case.new_frame_of_reference`` (its SEG gets a new Frame of Reference UID)."""
    headers = []
    for channel in channels:
        path = Path(case.images[channel])
        if path.is_file() and is_dicom_file(path):
            return (f"channel {channel}: {printable_path(path)} is a single DICOM file (one slice); give the folder "
                    "holding the whole series")
        header = read_header(path)
        if header.dicom and header.modality and header.modality != modality:
            return (f"channel {channel}: the DICOM series {printable_path(path)} is {header.modality}, but the model "
                    f"was trained on {modality}; give a {modality} series or a model trained on {header.modality}")
        headers.append(header)
    problem = _grid_problem(headers)
    if problem is not None:
        return problem
    if cfg.output_format == "nifti":
        return None
    first = headers[0]
    if not first.dicom:
        return (f"inference.output_format={cfg.output_format} writes a DICOM SEG, which needs a DICOM series as "
                f"source; channel {channels[0]} is the file {printable_path(first.path)} (use output_format=nifti "
                "for such cases)")
    if first.frame_of_reference is None:
        if cfg.dicom_seg.missing_frame_of_reference == "refuse":
            return (f"the DICOM series {printable_path(first.path)} has no Frame of Reference UID, so a DICOM SEG "
                    "cannot reference its space; set inference.dicom_seg.missing_frame_of_reference=new (a new UID, "
                    "noted in the SEG) or inference.output_format=nifti")
        case.new_frame_of_reference = True
    return None


def preflight(
    cases: Sequence[InferenceCase], channels: Sequence[str], modality: str, cfg: InferenceConfig
) -> list[InferenceCase]:
    """Check every case without a known problem (module docstring); sets ``problem`` on those
    that cannot give their outputs and returns the cases. Logs one line when some are refused."""
    refused = unnamed = 0
    for case in cases:
        if case.problem is not None:
            refused += 1
            continue
        try:
            case.problem = case_problem(case, channels, modality, cfg)
        except MedsegError as exc:
            case.problem = str(exc)
        refused += case.problem is not None
        unnamed += case.problem is None and case.modality is None and not Path(case.images[channels[0]]).is_dir()
    if unnamed:
        log.info("%d case(s) given as files name no modality (not DICOM); taken as the model's %s", unnamed, modality)
    if refused:
        log.warning("preflight: %d of %d case(s) refused before inference (%s says why)", refused, len(cases), FAILURES_FILE)
    return list(cases)
