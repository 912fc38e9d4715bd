"""Find the DICOM label objects (SEG or RTSTRUCT) under a folder and the image series each one
references (by SeriesInstanceUID), so ``medseg import dicom --labels`` can pair them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from medseg.dicom import rtstruct, seg_reader
from medseg.errors import InputFileError, MedsegError

log = logging.getLogger(__name__)

LabelKind = Literal["seg", "rtstruct"]
MODALITY = {"seg": "SEG", "rtstruct": "RTSTRUCT"}


def find_label_objects(root: str | Path, kind: LabelKind) -> dict[str, list[Path]]:
    """Referenced image SeriesInstanceUID -> the ``kind`` objects under ``root`` referencing it
    (sorted paths). Files that are not DICOM are skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    wanted = MODALITY[kind]
    found: dict[str, list[Path]] = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # not DICOM
        except Exception:  # noqa: BLE001 - pydicom raises other types for damaged or hostile headers
            continue
        if str(getattr(ds, "Modality", "")) != wanted:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            series = seg_reader.referenced_series(ds) if kind == "seg" else rtstruct.referenced_series(ds)
        except Exception as exc:  # noqa: BLE001 - pydicom raises several types for damaged files
            log.warning("%s: %s cannot be read (%s); skipped", path.name, wanted, exc)
            continue
        if not series:
            log.warning("%s: %s references no image series; skipped", path.name, wanted)
        for uid in dict.fromkeys(series):
            found.setdefault(uid, []).append(path)
    return found


def read_label_object(path: Path, kind: LabelKind, geometry, select: str | None):
    """(uint8 (I, J, K) mask on ``geometry``, names of the segments/ROIs used).

    Raises ``InputFileError`` naming ``path`` for any label object that cannot be used: the
    readers name the problems they know; anything else a hostile or damaged file makes pydicom or
    numpy raise is reported the same way (one line naming the file), never as a traceback."""
    try:
        if kind == "seg":
            return seg_reader.read_dicom_seg(path, geometry, select)
        return rtstruct.read_rtstruct(path, geometry, select)
    except MedsegError:
        raise
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, OverflowError) as exc:
        raise InputFileError(path, f"malformed {MODALITY[kind]} ({type(exc).__name__}: {exc})") from None
