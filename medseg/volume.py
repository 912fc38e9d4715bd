"""A volume and its grid (:class:`Geometry`, :class:`Volume`), the file suffixes medseg reads, the
checks that a NIfTI file holds its whole volume, and the C-contiguous (I, J, K) copy that reading
(the MONAI reader) and writing share. Axis conventions: :mod:`medseg.io`.

Truncated ``.gz`` files are a trap: ITK silently returns zeros for the missing part.
:func:`check_gzip_complete` compares the gzip trailer's uncompressed size with the size the
header promises (reading decompresses the stream fully only when they disagree; writing refuses
the file before its rename).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from medseg.errors import InputFileError, is_utf8_text
from medseg.geometry import LPS_TO_RAS

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Geometry:
    """ITK-style voxel grid: ``size`` (I, J, K), ``spacing`` mm, ``origin`` and ``direction``
    (row-major 3x3, columns = index axes) in **LPS** world coordinates."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def affine(self) -> np.ndarray:
        """4x4 RAS affine (nibabel convention) of this grid."""
        lps = np.eye(4)
        lps[:3, :3] = np.asarray(self.direction, dtype=np.float64).reshape(3, 3) * np.asarray(self.spacing)
        lps[:3, 3] = self.origin
        return LPS_TO_RAS @ lps

    @classmethod
    def from_affine(cls, affine: np.ndarray, size: Sequence[int]) -> Geometry:
        """Inverse of ``affine``; raises ValueError for sheared affines ITK cannot represent."""
        lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
        rot_zoom = lps[:3, :3]
        spacing = np.linalg.norm(rot_zoom, axis=0)
        direction = rot_zoom / spacing
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise ValueError("affine has shear; it cannot be written as an ITK direction matrix")
        return cls(
            size=tuple(int(s) for s in size),  # type: ignore[arg-type]
            spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
            origin=tuple(float(o) for o in lps[:3, 3]),  # type: ignore[arg-type]
            direction=tuple(float(d) for d in direction.ravel()),
        )

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Geometry:
        return cls(
            size=tuple(image.GetSize()),  # type: ignore[arg-type]
            spacing=tuple(image.GetSpacing()),  # type: ignore[arg-type]
            origin=tuple(image.GetOrigin()),  # type: ignore[arg-type]
            direction=tuple(image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> None:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)


@dataclass
class Volume:
    """A 3-D volume with its grid.

    ``array``: shape (I, J, K), file index order. ``geometry`` gives spacing/origin/direction;
    ``affine`` is the 4x4 RAS affine. ``path`` names the source for error messages.
    """

    array: np.ndarray
    geometry: Geometry
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def affine(self) -> np.ndarray:
        return self.geometry.affine

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def is_volume_path(path: str | Path) -> bool:
    """True for supported volume files and for folders (read as DICOM series)."""
    p = Path(path)
    return p.is_dir() or p.name.lower().endswith(VOLUME_SUFFIXES)


def nifti_payload_size(path: Path) -> int | None:
    """Size the NIfTI-1 header of ``path`` promises (vox_offset + voxel bytes; for a ``.gz`` file
    the uncompressed size), or None when ``path`` does not start with a readable NIfTI-1 header."""
    import nibabel as nib

    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as fh:
            raw = fh.read(348)
    except (OSError, EOFError, zlib.error):
        return None
    if len(raw) < 348:
        return None
    try:
        header = nib.Nifti1Header(raw, check=False)
        if header["sizeof_hdr"] != 348:
            return None
        return int(header["vox_offset"]) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    except Exception:  # noqa: BLE001 - not a NIfTI-1 header; let ITK judge the file
        return None


def check_nifti_complete(path: Path) -> None:
    """Raise InputFileError when an uncompressed .nii is shorter than its header promises (ITK
    would fill the missing voxels with zeros and read a half-empty scan without a word)."""
    expected = nifti_payload_size(path)
    size = path.stat().st_size
    if expected is not None and size < expected:
        raise InputFileError(path, f"file is truncated: {size} bytes, the header promises {expected}; re-copy or "
                                   "re-export it")


def check_gzip_complete(path: Path) -> bool:
    """Raise InputFileError if a .gz file is truncated or corrupt; return True when ITK can
    read it directly, False when it must be decompressed first.

    Fast path: the gzip trailer (ISIZE, uncompressed size mod 2**32) equals the size the NIfTI
    header promises. Otherwise the stream is decompressed fully, which detects truncation and
    CRC errors. Multi-member gzip files (bgzip output) pass this check but ITK misreads them,
    so they are flagged for decompression.
    """
    expected = nifti_payload_size(path)
    if expected is not None:
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", fh.read(4))
        if isize == expected % (1 << 32):
            return True
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    except EOFError:
        raise InputFileError(path, "file is truncated (the gzip stream ends early); re-copy or re-export it") from None
    except (OSError, zlib.error) as exc:
        raise InputFileError(path, f"file is corrupt (gzip error: {exc})") from None
    if expected is not None and total < expected:
        raise InputFileError(path, f"file is truncated: {total} bytes of image data, the header promises {expected}")
    return expected is None



def first_error_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "ERROR" in ln or "error" in ln] or lines
    return useful[-1][:200] if useful else type(exc).__name__



# dtypes whose copies every supported torch version implements (unsigned 16/32/64-bit: not before 2.3+)
_TORCH_COPY_DTYPES = {np.dtype(t) for t in (np.bool_, np.int8, np.uint8, np.int16, np.int32, np.int64,
                                            np.float16, np.float32, np.float64)}


# planes per transposing copy in ``contiguous``: small planes in one call cut the per-call
# overhead; larger blocks were slower (cache), so planes above this size go one by one
TRANSPOSE_CHUNK_BYTES = 256 << 10


def contiguous(array: np.ndarray) -> np.ndarray:
    """C-contiguous copy of ``array`` (itself when it already is), with the same values.

    MONAI's ``LoadImage`` makes its arrays contiguous with numpy; for the (I, J, K) view of a
    SimpleITK (K, J, I) buffer -- and for the (K, J, I) copy written from an (I, J, K) array --
    that is a 3-D transposing copy. Done instead as 2-D transposes of J planes with torch,
    several small planes per call (up to ``TRANSPOSE_CHUNK_BYTES``): 7 vs 40 ms for a BraTS
    int16 channel (11 ms one plane per call), 76 vs 296 ms for a 512x512x200 CT (numpy's 2nd).
    """
    if array.flags.c_contiguous:
        return array
    if array.dtype not in _TORCH_COPY_DTYPES or not array.dtype.isnative or not array.flags.writeable:
        return np.ascontiguousarray(array)
    if array.ndim == 3 and array.flags.f_contiguous:  # the axis-reversed view of a C-ordered buffer
        source = torch.from_numpy(array.T)  # (K, J, I) C-contiguous: no copy
        out = torch.empty(array.shape, dtype=source.dtype)
        step = max(1, TRANSPOSE_CHUNK_BYTES // (array.shape[0] * array.shape[2] * array.itemsize))
        for j in range(0, array.shape[1], step):
            out[:, j : j + step, :] = source[:, j : j + step, :].permute(2, 1, 0)
        return out.numpy()
    return torch.from_numpy(array).contiguous().numpy()


def itk_can_take(path: str | Path) -> bool:
    """True when ``path`` is valid UTF-8 text. SimpleITK converts paths to UTF-8 C strings; a
    name that is not (a Latin-1 file name on a UTF-8 system reaches Python as surrogate escapes)
    aborts the whole process inside ITK (SIGABRT, no Python exception) -- so medseg never hands
    such a path to ITK."""
    return is_utf8_text(path)
