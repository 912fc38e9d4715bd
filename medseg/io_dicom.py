"""Read a DICOM series folder as ITK's image: which series of the folder (one CT/MR series, or
refused naming the competitors), its slice spacing checked against the instances' positions, its
headers, and GDCM's locale kept from leaking into the process (one series read at a time).

:func:`medseg.io.read_volume` reads a folder through :func:`read_dicom_series`; arrays, affines
and errors then follow :mod:`medseg.io`'s conventions.
"""

from __future__ import annotations

import locale
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medseg.errors import InputFileError


@contextmanager
def preserve_locale() -> Iterator[None]:
    """Restore the C library locale after GDCM calls.

    GDCM (SimpleITK's DICOM library) switches the process locale to "C"; Python then opens
    text files as ASCII by default, and any later non-ASCII write in the same process fails.
    """
    saved = {cat: locale.setlocale(cat) for cat in (locale.LC_CTYPE, locale.LC_NUMERIC)}
    try:
        yield
    finally:
        for cat, value in saved.items():
            locale.setlocale(cat, value)


# one DICOM series read at a time: ``preserve_locale`` saves and restores a process-wide setting,
# which two overlapping reads (channels loaded in parallel threads) would leave at GDCM's "C"
_DICOM_LOCK = threading.Lock()


def read_dicom_series(folder: Path) -> sitk.Image:
    with _DICOM_LOCK, preserve_locale():
        return _read_dicom_series_unguarded(folder)


def dicom_series_files(folder: str | Path) -> list[str]:
    """The files of the DICOM series medseg reads from ``folder``, in GDCM's slice order.

    Several series in one folder: the one with most files (typical: localisers, or a DICOM SEG
    written beside the main series), ties broken by series UID -- deterministic, and the same
    series every reader of the folder (volume, DICOM SEG writer) refers to. Two or more CT/MR
    image series of two or more instances each (not localisers) are refused, listed: which one
    is meant cannot be guessed (``medseg import dicom`` gives one manifest row per series)."""
    path = Path(folder)
    with _DICOM_LOCK, preserve_locale():
        return _dicom_series_files(path)


# series of these modalities, single-instance series and localisers (ImageType LOCALIZER) may
# lie beside the series medseg reads; two series of these modalities may not
_VOLUME_MODALITIES = ("CT", "MR")


def _dicom_series_files(folder: Path) -> list[str]:
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise InputFileError(folder, "folder holds no DICOM series (no readable DICOM files found)")
    files_by_id = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in ids}
    series_id = max(ids, key=lambda sid: (len(files_by_id[sid]), sid))
    if len(ids) > 1:
        _refuse_competing_series(folder, [files_by_id[sid] for sid in ids])
    return list(files_by_id[series_id])


def _refuse_competing_series(folder: Path, series: list[Sequence[str]]) -> None:
    """Raise ``InputFileError`` listing the volume series (above) when ``folder`` holds two or more."""
    import pydicom

    volumes = []
    for files in series:
        if len(files) < 2:
            continue
        try:
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - unreadable here: GDCM's reading will name it
            continue
        image_type = [str(v).upper() for v in (getattr(ds, "ImageType", None) or [])]
        if str(getattr(ds, "Modality", "")).upper() in _VOLUME_MODALITIES and "LOCALIZER" not in image_type:
            volumes.append((getattr(ds, "SeriesNumber", None), str(getattr(ds, "SeriesDescription", "") or ""),
                            str(ds.Modality), len(files)))
    if len(volumes) < 2:
        return
    volumes.sort(key=lambda v: (v[0] is None, v[0] if v[0] is not None else 0, v[1]))
    listing = "; ".join(f"series {'?' if number is None else number} {description!r} ({modality}, {n} instances)"
                        for number, description, modality, n in volumes)
    raise InputFileError(folder, f"folder holds {len(volumes)} image series ({listing}); medseg reads one series "
                                 "per folder: import it with `medseg import dicom` (one row per series) or move "
                                 "each series into its own folder")


# the positions of a series' slices may differ from an even grid by this much (mm): the larger
# of an absolute tolerance and a fraction of the slice spacing (DS values are rounded decimals)
SLICE_POSITION_ATOL_MM = 0.01
SLICE_POSITION_RTOL = 0.01


def dicom_slice_spacing(headers: Sequence[tuple[Path, Any]], folder: Path) -> float:
    """The slice spacing (mm) of a single-frame series after checking its geometry; ``headers``:
    (path, pydicom dataset) of every instance, any order.

    Every instance needs Image Position (Patient) and Image Orientation (Patient); the
    orientations agree; the positions are distinct, lie on one line along the slice normal and
    are evenly spaced (within ``max(SLICE_POSITION_ATOL_MM, SLICE_POSITION_RTOL x spacing)``).
    Otherwise ``InputFileError``: missing slices name the gap (the positions either side and how
    many slices are missing), duplicated positions the files. Without these checks ITK reads a
    series with missing slices with an averaged spacing and one without positions at 1 mm --
    a volume whose masks land on the wrong anatomy."""
    positions, orientation = [], None
    for path, ds in headers:
        ipp, iop = getattr(ds, "ImagePositionPatient", None), getattr(ds, "ImageOrientationPatient", None)
        if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
            missing = " and ".join(n for n, v, k in (("Image Position (Patient)", ipp, 3),
                                                     ("Image Orientation (Patient)", iop, 6)) if v is None or len(v) != k)
            raise InputFileError(path, f"DICOM instance has no {missing}; the slice positions (and so the slice "
                                       "spacing) of the series are unknown")
        values = np.asarray([float(v) for v in iop])
        if orientation is None:
            orientation = values
        elif np.abs(values - orientation).max() > 1e-4:
            raise InputFileError(path, f"Image Orientation (Patient) {np.round(values, 5).tolist()} differs from "
                                       f"the series' {np.round(orientation, 5).tolist()} ({headers[0][0].name})")
        positions.append([float(v) for v in ipp])
    assert orientation is not None
    normal = np.cross(orientation[:3], orientation[3:])
    points = np.asarray(positions)
    along = points @ normal
    order = np.argsort(along, kind="stable")
    along, points = along[order], points[order]
    names = [headers[int(i)][0].name for i in order]
    steps = np.diff(along)
    distinct = steps[steps > SLICE_POSITION_ATOL_MM]
    if len(distinct) < len(steps):
        i = int(np.argmax(steps <= SLICE_POSITION_ATOL_MM))
        same = [n for n, a in zip(names, along, strict=True) if abs(a - along[i]) <= SLICE_POSITION_ATOL_MM]
        raise InputFileError(folder, f"DICOM series has {len(steps) - len(distinct)} duplicated slice position(s): "
                                     f"{', '.join(same[:4])} are at the same position {np.round(points[i], 3).tolist()}; "
                                     "remove the duplicates (a series exported twice?)")
    step = float(distinct.min())
    tol = max(SLICE_POSITION_ATOL_MM, SLICE_POSITION_RTOL * step)
    off_line = points - points[0] - np.outer(along - along[0], normal)
    worst = int(np.argmax(np.linalg.norm(off_line, axis=1)))
    if np.linalg.norm(off_line[worst]) > tol:
        raise InputFileError(folder, f"DICOM slice positions do not lie on a line along the slice normal ({names[worst]} "
                                     f"is {np.linalg.norm(off_line[worst]):.3f} mm off it: a tilted gantry or mixed "
                                     "series); medseg reads only straight stacks")
    gaps = []
    for i, d in enumerate(steps):
        ratio = d / step
        if abs(d - step) <= tol:
            continue
        n = int(round(ratio))
        if n >= 2 and abs(d - n * step) <= tol * n:
            gaps.append(f"{n - 1} slice(s) missing between {np.round(points[i], 3).tolist()} ({names[i]}) and "
                        f"{np.round(points[i + 1], 3).tolist()} ({names[i + 1]})")
        else:
            raise InputFileError(folder, f"DICOM slices are unevenly spaced: {d:.3f} mm between {names[i]} and "
                                         f"{names[i + 1]}, {step:.3f} mm elsewhere; medseg reads only evenly spaced series")
    if gaps:
        raise InputFileError(folder, f"DICOM series has missing slices ({step:g} mm spacing): {'; '.join(gaps[:3])}"
                                     + (f"; and {len(gaps) - 3} more gap(s)" if len(gaps) > 3 else ""))
    return float((along[-1] - along[0]) / (len(along) - 1)) if len(along) > 1 else step


def dicom_series_headers(folder: str | Path, files: Sequence[str] | None = None) -> list[tuple[Path, Any]]:
    """(path, pydicom dataset without pixel data) of every instance of the series medseg reads
    from ``folder`` (``files``: :func:`dicom_series_files`), in that order."""
    import pydicom

    out = []
    for name in files if files is not None else dicom_series_files(folder):
        try:
            out.append((Path(name), pydicom.dcmread(name, stop_before_pixels=True)))
        except Exception as exc:  # noqa: BLE001 - pydicom raises several types for damaged files
            raise InputFileError(name, f"cannot read DICOM header ({exc})") from None
    return out


def _read_dicom_series_unguarded(folder: Path) -> sitk.Image:
    files = _dicom_series_files(folder)
    if len(files) < 2:
        raise InputFileError(folder, "DICOM series has a single slice; a 3-D volume is needed")
    headers = dicom_series_headers(folder, files)
    if all(int(getattr(ds, "NumberOfFrames", 1) or 1) == 1 for _, ds in headers):
        step = dicom_slice_spacing(headers, folder)
    else:  # multi-frame instances: their per-frame positions are ITK's to read
        step = None
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    # Patient identifiers stay inside the DICOM files: no tag is copied into meta.
    reader.MetaDataDictionaryArrayUpdateOff()
    reader.LoadPrivateTagsOff()
    image = reader.Execute()
    if step is not None and image.GetDimension() == 3:
        spacing = image.GetSpacing()
        if abs(spacing[2] - step) > max(SLICE_POSITION_ATOL_MM, SLICE_POSITION_RTOL * step):
            raise InputFileError(folder, f"ITK read the series with {spacing[2]:g} mm between slices, its positions "
                                         f"say {step:g} mm")
    return image
