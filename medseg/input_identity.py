"""The identity of an input volume: cheap enough to take for every case of a batch, sharp
enough that a scan replaced in place is a new input.

What is compared (never the whole file: a CT volume is hundreds of MB):

====================  =======================================================================
input                 identity
====================  =======================================================================
file                  ``size``, ``mtime_ns`` and ``head_sha256``: the SHA-256 of its first
                      :data:`HEAD_BYTES` (a NIfTI/NRRD/MHA header and the start of the
                      voxels; the gzip stream of a ``.nii.gz`` from its first byte)
DICOM series folder   ``files`` (how many), ``listing_sha256``: the SHA-256 of the sorted
                      (relative path, size, mtime_ns) of every file under it, and
                      ``head_sha256`` of its first file (in that order)
missing / unreadable  ``error``: the reason (the case fails on reading anyway)
====================  =======================================================================

Used by the inference completion marker (:mod:`medseg.inference.case_files`: a case whose inputs
changed is predicted again) and the pipeline's stage fingerprints (:mod:`medseg.pipeline.state`:
a stage whose manifest's files changed runs again). A copy that keeps the mtime, size and first
64 KiB but changes a voxel further on is not seen (the price of not reading whole volumes); a
``touch`` alone is seen (the case is recomputed, which is harmless).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HEAD_BYTES = 64 * 1024


def _head_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.sha256(handle.read(HEAD_BYTES)).hexdigest()


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def input_identity(path: str | Path) -> dict[str, Any]:
    """The identity of one input file or DICOM series folder (table in the module docstring);
    a JSON-ready dict, equal for equal inputs after a JSON round trip."""
    p = Path(path)
    try:
        if p.is_dir():
            return _folder_identity(p)
        stat = p.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_sha256": _head_sha256(p)}
    except OSError as exc:
        return {"error": _reason(exc)}


def _folder_identity(folder: Path) -> dict[str, Any]:
    """A DICOM series folder: every file under it (symbolic links followed to their files)."""
    listing: list[tuple[str, int, int]] = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in names:
            file = Path(root) / name
            try:
                stat = file.stat()
            except OSError:  # a dangling link: listed without a size
                listing.append((file.relative_to(folder).as_posix(), -1, -1))
                continue
            listing.append((file.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns))
    listing.sort()
    digest = hashlib.sha256(repr(listing).encode("utf-8", "surrogateescape")).hexdigest()
    head = None
    for name, size, _ in listing:
        if size >= 0:
            head = _head_sha256(folder / name)
            break
    return {"files": len(listing), "listing_sha256": digest, "head_sha256": head}


def inputs_identity(images: Mapping[str, str | Path]) -> dict[str, dict[str, Any]]:
    """``{channel: input_identity(path)}`` for a case's channel files."""
    return {name: input_identity(path) for name, path in images.items()}
