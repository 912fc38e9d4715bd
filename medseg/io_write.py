"""Write volumes and masks on a source grid, atomically, each file verified before its rename
(the trap below). Arrays are (I, J, K), affines voxel-to-RAS (:mod:`medseg.io`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medseg.atomic import atomic_path, failed_write_reason
from medseg.errors import GeometryMismatchError, InputFileError, OutputError
from medseg.volume import (
    Geometry,
    Volume,
    check_gzip_complete,
    contiguous,
    first_error_line,
    itk_can_take,
    nifti_payload_size,
)


def _atomic_sitk_write(image: sitk.Image, out_path: Path, compress: bool) -> None:
    """Write ``image`` to a temporary file beside ``out_path``, verify it (:func:`_verify_written`),
    then rename it onto ``out_path``; on any failure the temporary file goes and an existing
    ``out_path`` is left as it was."""
    with atomic_path(out_path) as tmp:
        if itk_can_take(tmp):
            _itk_write(image, tmp, out_path, compress)
            return
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory(prefix="medseg-write-", dir=None) as plain_dir:  # ITK writes a plain name
            plain = Path(plain_dir) / ("output" + "".join(out_path.suffixes[-2:]))
            _itk_write(image, plain, out_path, compress)
            shutil.move(os.fsencode(plain), os.fsencode(tmp))


def _itk_write(image: sitk.Image, path: Path, target: Path, compress: bool) -> None:
    """``sitk.WriteImage`` to ``path``, then :func:`_verify_written`. Its multi-line C++ exception
    (disk full, permission) becomes one ``OutputError`` line naming ``target`` (the user's file,
    not the temporary one)."""
    try:
        sitk.WriteImage(image, str(path), useCompression=compress)
    except RuntimeError as exc:
        raise OutputError(target, f"cannot write: {failed_write_reason(path.parent, _itk_reason(str(exc)), target)}") from None
    _verify_written(image, path, target, compress)


# Trap: ITK's NIfTI writer does not report a failed write. On a full disk it returns normally
# and leaves a truncated (or empty) file -- renamed onto the target, that replaced a good volume
# with a 16 KB fragment (NRRD and MetaImage do raise). So every written volume is checked before
# the rename, cheaply: its header must read back with the image's size and pixel type, and its
# length must hold the voxel data (.nii) or its gzip trailer must state the uncompressed size the
# header promises (.nii.gz; a stream cut short ends in compressed bytes, not that size). Formats
# without such a cheap test (compressed NRRD/MHA) are read back in full.


def _verify_written(image: sitk.Image, path: Path, target: Path, compress: bool) -> None:
    """Raise ``OutputError`` naming ``target`` unless ``path`` holds ``image`` completely (above)."""
    try:
        size = path.stat().st_size
    except OSError:
        size = -1
    if size <= 0:
        problem = "the writer left no file" if size < 0 else "the written file is empty"
        raise OutputError(target, f"cannot write: {failed_write_reason(path.parent, problem, target)}")
    n_voxels = int(np.prod(image.GetSize())) * image.GetNumberOfComponentsPerPixel()
    payload = n_voxels * image.GetSizeOfPixelComponent()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        header_ok = reader.GetSize() == image.GetSize() and reader.GetPixelID() == image.GetPixelID()
    except RuntimeError:
        header_ok = False
    if not header_ok:
        raise OutputError(target, f"cannot write: {failed_write_reason(path.parent, 'the written header does not read back', target)}")
    name = path.name.lower()
    problem = None
    if name.endswith(".nii.gz"):
        problem = _gzip_incomplete(path)
    elif name.endswith(".nii") or (name.endswith((".nrrd", ".mha")) and not compress):
        if size < payload:  # the header plus the raw voxels: at least the voxels
            problem = f"the written file has {size} bytes, its voxel data {payload}"
    elif name.endswith((".nrrd", ".mha")):  # compressed: no size to compare, read it back
        try:
            sitk.ReadImage(str(path))
        except RuntimeError as exc:
            problem = f"the written file does not read back ({first_error_line(exc)})"
    if problem:
        raise OutputError(target, f"cannot write: {failed_write_reason(path.parent, problem, target)}")


def _gzip_incomplete(path: Path) -> str | None:
    """Why the written ``.nii.gz`` ``path`` is incomplete, or None: its gzip trailer (ISIZE) must
    equal the size its header promises; otherwise the stream is decompressed to be sure."""
    if nifti_payload_size(path) is None:
        return "the written header does not read back"
    try:
        check_gzip_complete(path)
    except InputFileError:
        return "the written file is incomplete (its gzip stream ends early or is damaged)"
    return None


def _itk_reason(message: str) -> str:
    """The useful line of an ITK exception text (its description, without the C++ location)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if line.lower().startswith(("description:", "reason:")):
            return line.split(":", 1)[1].strip()
    return lines[-1] if lines else "ITK error"


def write_volume(
    array: np.ndarray,
    reference: Volume | Geometry,
    out_path: str | Path,
    dtype: np.dtype | type = np.uint8,
    compress: bool = True,
) -> Path:
    """Write ``array`` (I, J, K) on the grid of ``reference`` atomically (temp file + rename).

    The output has exactly the reference's shape, spacing, origin and direction, so it overlays
    the source image in any viewer. The format follows the suffix (``.nii.gz`` recommended).
    """
    geometry = reference.geometry if isinstance(reference, Volume) else reference
    arr = np.asarray(array)
    if tuple(arr.shape) != tuple(geometry.size):
        src = reference.path if isinstance(reference, Volume) else "reference grid"
        raise GeometryMismatchError(
            f"cannot write {out_path}: array shape {tuple(arr.shape)} differs from the source grid {tuple(geometry.size)} of {src}"
        )
    image = sitk.GetImageFromArray(contiguous(arr.astype(dtype, copy=False).transpose(2, 1, 0)))  # (K, J, I)
    geometry.apply_to(image)
    out = Path(out_path)
    _atomic_sitk_write(image, out, compress)
    return out


def write_mask(mask: np.ndarray, reference: Volume | Geometry, out_path: str | Path) -> Path:
    """Write a uint8 mask (I, J, K) as compressed NIfTI on the reference grid, atomically."""
    return write_volume(mask, reference, out_path, dtype=np.uint8, compress=True)
