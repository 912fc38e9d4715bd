"""A volume write that fails is a failure: verified before the rename, never replacing a good
file with a truncated one, one line naming the file (issue 32, part 1).

ITK's NIfTI writer does not report a failed write: on a full disk it returns normally and leaves
a truncated file. The in-process tests inject such silent failures into ``sitk.WriteImage``; the
subprocess tests fill a real (tmpfs) file system, skipped where mounting one is not permitted.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg import io as medseg_io
from medseg.atomic import write_json
from medseg.errors import OutputError
from medseg.io import Geometry, read_volume, write_volume

from .conftest import assert_refused, leftovers, run_cli

GEOMETRY = Geometry((24, 20, 6), (0.8, 0.8, 3.0), (10.0, -4.0, 2.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3000, GEOMETRY.size).astype(np.int16)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- injected failures


def _silently(damage):
    """A ``sitk.WriteImage`` that writes the file, then ``damage(path)``s it and returns normally,
    as ITK's NIfTI writer does on a full disk."""
    real = sitk.WriteImage

    def write(image, path, useCompression=False, **kwargs):  # noqa: N803 - SimpleITK's name
        real(image, path, useCompression=useCompression, **kwargs)
        damage(Path(path))

    return write


def _truncate_to(n_bytes: int):
    def damage(path: Path) -> None:
        with open(path, "rb+") as fh:
            fh.truncate(n_bytes)
    return damage


def _remove(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(("suffix", "damage", "what"), [
    (".nii.gz", _truncate_to(600), "incomplete"),            # a gzip stream cut short
    (".nii.gz", _truncate_to(0), "empty"),                   # "14 zero-byte volumes"
    (".nii.gz", _remove, "no file"),
    (".nii", _truncate_to(1200), "bytes, its voxel data"),   # header and part of the voxels
    (".nrrd", _truncate_to(400), "cannot write"),
])  # fmt: skip
def test_silent_itk_failure_is_an_error_and_the_old_file_is_kept(tmp_path, monkeypatch, suffix, damage, what):
    target = tmp_path / f"vol{suffix}"
    write_volume(_volume(0), GEOMETRY, target, dtype=np.int16)
    before = _sha(target)
    monkeypatch.setattr(medseg_io.sitk, "WriteImage", _silently(damage))
    with pytest.raises(OutputError) as info:
        write_volume(_volume(1), GEOMETRY, target, dtype=np.int16)
    message = str(info.value)
    assert message.startswith(f"{target}: cannot write"), message
    assert what in message and "the existing file is unchanged" in message, message
    assert "\n" not in message
    assert _sha(target) == before  # the good volume was not replaced
    assert _files(tmp_path) == [target.name]  # no temporary file stays
    monkeypatch.undo()
    np.testing.assert_array_equal(read_volume(target).array, _volume(0))


def test_header_of_another_type_is_refused(tmp_path, monkeypatch):
    """A file that reads back with the wrong voxel type (a writer that ignored the pixel type) is
    not accepted as the volume."""
    real = sitk.WriteImage

    def wrong_type(image, path, useCompression=False, **kwargs):  # noqa: N803
        real(sitk.Cast(image, sitk.sitkFloat32), path, useCompression=useCompression)

    monkeypatch.setattr(medseg_io.sitk, "WriteImage", wrong_type)
    with pytest.raises(OutputError, match="header does not read back"):
        write_volume(_volume(), GEOMETRY, tmp_path / "v.nii.gz", dtype=np.int16)
    assert _files(tmp_path) == []


def test_itk_error_with_disk_full_is_one_line(tmp_path, monkeypatch):
    def full(image, path, useCompression=False, **kwargs):  # noqa: N803
        Path(path).write_bytes(b"partial")
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: itkMetaImageIO.cxx:1110:\n"
                           "ITK ERROR: MetaImageIO(0x1): File cannot be written: x.mha\n"
                           "Reason: No space left on device")

    monkeypatch.setattr(medseg_io.sitk, "WriteImage", full)
    with pytest.raises(OutputError) as info:
        write_volume(_volume(), GEOMETRY, tmp_path / "v.mha", dtype=np.int16)
    assert str(info.value) == f"{tmp_path / 'v.mha'}: cannot write: no space left on the device"
    assert _files(tmp_path) == []


def test_verified_writes_still_round_trip(tmp_path):
    for suffix, compress in ((".nii.gz", True), (".nii", False), (".nrrd", True), (".nrrd", False), (".mha", True)):
        path = tmp_path / f"v_{compress}{suffix}"
        write_volume(_volume(), GEOMETRY, path, dtype=np.int16, compress=compress)
        np.testing.assert_array_equal(read_volume(path).array, _volume())


# --------------------------------------------------------------------------- a real full disk


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 KiB tmpfs at ``tmp_path / "disk"`` (root only; skipped where mounting is refused)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def _fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` up to ``leave`` free bytes with ``disk/filler``."""
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                stats = os.statvfs(disk)
                free = stats.f_bavail * stats.f_frsize
                if free <= leave:
                    break
                fh.write(b"\0" * min(free - leave, 4096))
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


SYNTH = ["--n", "1", "--shape", "48", "48", "8"]  # volumes of 10-40 KB each


def test_synth_rerun_on_a_full_disk_keeps_the_good_volumes(small_disk):
    out = small_disk / "data"
    first = run_cli("synth", "--out", out, *SYNTH)
    assert first.returncode == 0, first.stderr
    before = {name: _sha(out / name) for name in _files(out)}
    _fill(small_disk, leave=12288)  # the folder check and the run lock fit, a volume does not
    again = run_cli("synth", "--out", out, *SYNTH)
    line = assert_refused(again, str(out / "phantom_000_flair.nii.gz"), "no space left on the device",
                          "the existing file is unchanged")
    assert line.count(str(small_disk)) == 1
    assert {name: _sha(out / name) for name in _files(out)} == before  # every old file intact
    assert not leftovers(out)


def test_synth_onto_a_full_disk_leaves_no_volume(small_disk):
    _fill(small_disk, leave=8192)  # room for the folder and its marker, not for the volumes
    out = small_disk / "data"
    proc = run_cli("synth", "--out", out, "--n", "3", "--shape", "32", "32", "8")
    assert_refused(proc, str(out / "phantom_"), "no space left on the device")
    assert not list(out.glob("*.nii.gz")), _files(out)  # neither zero-byte nor truncated volumes
    assert not leftovers(out)


def test_text_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(small_disk):
    target = small_disk / "summary.json"
    write_json(target, {"old": True})
    _fill(small_disk)
    with pytest.raises(OutputError) as info:
        write_json(target, {"new": "x" * 100_000})
    assert str(info.value) == f"{target}: cannot write: no space left on the device; the existing file is unchanged"
    assert target.read_text() == '{\n  "old": true\n}\n'
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "summary.json"]


# --------------------------------------------------------------------------- synth arguments


@pytest.mark.parametrize(("args", "fragment"), [
    (["--n", "-3"], "--n -3: the number of cases must be at least 1"),
    (["--shape", "5000", "5000", "5000"], "--shape 5000 5000 5000: 125,000,000,000 voxels"),
    (["--shape", "0", "16", "4"], "each at least 2"),
])  # fmt: skip
def test_synth_bad_arguments_are_one_line_before_any_work(tmp_path, args, fragment):
    out = tmp_path / "out"
    proc = run_cli("synth", "--out", out, *args)
    assert_refused(proc, fragment)
    assert not out.exists()
