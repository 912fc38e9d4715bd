"""Hostile-but-realistic DICOM label objects and SEG exports (issue 32, second sweep, items 6 and 8).

`medseg import dicom --labels seg|rtstruct` with a malformed SEG (a frame naming no segment,
NumberOfFrames below the frames present) or RTSTRUCT (NaN or non-triple ContourData, a contour
item naming no ROI, a contour reaching far outside the image): that series is refused -- one
line on stderr naming the label file and the problem, a row of ``<stem>_failures.csv``, exit 1 --
and the other series are imported and labelled as usual; nothing of the refused series is left
(no label file, no series folder, no row). A bad ``--select`` is one ``error:`` line, nothing
written. `medseg export-seg --multi-class` makes one segment per distinct value (a mask holding
1,000,000 once used 22 GB) and refuses more than 255 with one line.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.io import Geometry, read_volume

from .conftest import error_lines, leftovers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dicom_helpers import write_rtstruct, write_series  # noqa: E402

pytest.importorskip("highdicom")

SECRET = "5e" * 32
SHAPE = (16, 12, 6)
GOOD_UID, BAD_UID = "1.2.826.0.1.3680043.8.498.41", "1.2.826.0.1.3680043.8.498.42"
FOR_UID = "1.2.826.0.1.3680043.8.498.3"


def medseg(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m medseg.cli ARGS`` with a fixed site secret."""
    env = {**os.environ, "MEDSEG_SITE_SECRET": SECRET, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "medseg.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)  # fmt: skip


def _grid(origin_x: float) -> Geometry:
    return Geometry(SHAPE, (0.8, 0.7, 2.0), (origin_x, -3.0, 10.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))


def _archive(root: Path) -> dict[str, tuple[Path, Geometry]]:
    """Two CT series of one patient (two studies' worth of UIDs, one frame of reference each)."""
    rng = np.random.default_rng(3)
    out = {}
    for name, uid, x in (("good", GOOD_UID, 5.0), ("bad", BAD_UID, 40.0)):
        folder = root / name / "CT"
        write_series(folder, (rng.random(SHAPE) * 500).astype(np.int16), _grid(x), series_uid=uid,
                     frame_of_reference=f"{FOR_UID}.{2 if name == 'bad' else 1}")  # fmt: skip
        out[name] = (folder, read_volume(folder).geometry)
    return out


def _block() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:9, 2:7, 1:4] = 1
    return mask


def _write_segs(root: Path, series: dict[str, tuple[Path, Geometry]]) -> Path:
    from medseg.dicom.seg_writer import write_dicom_seg

    for name, (folder, geometry) in series.items():
        write_dicom_seg(_block(), geometry, folder, root / name / "SEG" / f"{name}_seg.dcm")
    return root / "bad" / "SEG" / "bad_seg.dcm"


def _rect(geometry: Geometry, k: int, shift_mm: float = 0.0) -> np.ndarray:
    """A rectangle along voxel edges on slice k (LPS mm), moved ``shift_mm`` along the rows."""
    matrix = np.asarray(geometry.direction).reshape(3, 3) * np.asarray(geometry.spacing)
    corners = np.array([[2.5, 1.5, k], [8.5, 1.5, k], [8.5, 6.5, k], [2.5, 6.5, k]])
    return np.asarray(geometry.origin) + corners @ matrix.T + np.array([shift_mm, 0.0, 0.0])


def _write_rtstructs(root: Path, series: dict[str, tuple[Path, Geometry]], shift_mm: float = 0.0) -> Path:
    for name, (folder, geometry) in series.items():
        uid = GOOD_UID if name == "good" else BAD_UID
        write_rtstruct(root / name / "RTSTRUCT" / f"{name}_rs.dcm", folder,
                       {"GTV": [_rect(geometry, 2, shift_mm if name == "bad" else 0.0)]}, series_uid=uid,
                       frame_of_reference=f"{FOR_UID}.{2 if name == 'bad' else 1}")  # fmt: skip
    bad = root / "bad" / "RTSTRUCT" / "bad_rs.dcm"
    _edit(bad, _other_instance)  # the helper gives every RTSTRUCT the same UIDs
    return bad


def _other_instance(ds) -> None:
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.90"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.90.1"


def _edit(path: Path, change) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _drop_referenced_segment_number(ds) -> None:
    """Each frame's Segment Identification moved into its per-frame groups, without the number."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    shared = ds.SharedFunctionalGroupsSequence[0]
    if "SegmentIdentificationSequence" in shared:
        del shared.SegmentIdentificationSequence
    for item in ds.PerFrameFunctionalGroupsSequence:
        item.SegmentIdentificationSequence = Sequence([Dataset()])


def _fewer_frames(ds) -> None:
    ds.NumberOfFrames = int(ds.NumberOfFrames) - 1


def _nan_contour(ds) -> None:
    import warnings

    contour = ds.ROIContourSequence[0].ContourSequence[0]
    values = [str(v) for v in contour.ContourData]
    values[4] = "NaN"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that NaN is no valid DS: the point of the test
        contour.ContourData = values


def _not_triples(ds) -> None:
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    contour.ContourData = list(contour.ContourData)[:-1]


def _no_roi_number(ds) -> None:
    del ds.ROIContourSequence[0].ReferencedROINumber


BAD_LABELS = {
    "seg-no-segment-number": ("seg", _drop_referenced_segment_number, "names no segment"),
    "seg-fewer-frames": ("seg", _fewer_frames, "NumberOfFrames"),
    "rtstruct-nan": ("rtstruct", _nan_contour, "non-finite"),
    "rtstruct-not-triples": ("rtstruct", _not_triples, "not x, y, z triples"),
    "rtstruct-no-roi-number": ("rtstruct", _no_roi_number, "Referenced ROI Number"),
    "rtstruct-500mm-outside": ("rtstruct", None, "mm outside the image"),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_a_bad_label_object_refuses_its_series_only(tmp_path, case):
    kind, change, fragment = BAD_LABELS[case]
    root = tmp_path / "archive"
    series = _archive(root)
    if kind == "seg":
        bad = _write_segs(root, series)
    else:
        bad = _write_rtstructs(root, series, shift_mm=500.0 if change is None else 0.0)
    if change is not None:
        _edit(bad, change)
    out = tmp_path / "out"
    proc = medseg("import", "dicom", root, "--labels", kind, "--out", out / "m.csv", "--val-fraction", "0")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and not error_lines(proc.stderr), proc.stderr
    refused = [line for line in proc.stderr.splitlines() if line.startswith("refused ")]
    assert len(refused) == 1, proc.stderr
    assert bad.name in refused[0] and fragment in refused[0], refused[0]
    with (out / "m.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["split"] == "train" and rows[0]["label"], rows
    good = read_volume(out / rows[0]["label"])
    np.testing.assert_array_equal(good.array > 0, _block() > 0 if kind == "seg" else _rect_mask())
    with (out / "m_failures.csv").open(newline="") as fh:
        failures = list(csv.DictReader(fh))
    (failure,) = failures
    bad_case = failure["what"]
    assert bad.name in failure["error"] and bad_case != rows[0]["case_id"]
    # nothing of the refused series is left: no label, no series folder, no temporary file
    assert sorted(p.name for p in (out / "labels").iterdir()) == [f"{rows[0]['case_id']}_label.nii.gz"]
    assert sorted(p.name for p in (out / "dicom_series").iterdir()) == [rows[0]["case_id"]]
    assert leftovers(out) == []


def _rect_mask() -> np.ndarray:
    expected = np.zeros(SHAPE, bool)
    expected[3:9, 2:7, 2] = True
    return expected


def test_a_contour_slightly_past_the_edge_is_kept(tmp_path):
    """A contour drawn along the image border (points up to one voxel past the edge) is no wrong
    pairing: it is filled (clipped to the image) without a refusal."""
    root = tmp_path / "archive"
    series = _archive(root)
    folder, geometry = series["good"]
    matrix = np.asarray(geometry.direction).reshape(3, 3) * np.asarray(geometry.spacing)
    corners = np.array([[-1.2, -1.2, 2], [SHAPE[0] + 0.2, -1.2, 2], [SHAPE[0] + 0.2, 4.5, 2], [-1.2, 4.5, 2]])
    write_rtstruct(root / "good" / "rs.dcm", folder, {"BODY": [np.asarray(geometry.origin) + corners @ matrix.T]},
                   series_uid=GOOD_UID, frame_of_reference=f"{FOR_UID}.1")  # fmt: skip
    proc = medseg("import", "dicom", root, "--labels", "rtstruct", "--out", tmp_path / "m.csv", "--val-fraction", "0")
    assert proc.returncode == 0, proc.stderr
    with (tmp_path / "m.csv").open(newline="") as fh:
        labelled = [r for r in csv.DictReader(fh) if r["label"]]
    label = read_volume(tmp_path / labelled[0]["label"]).array
    assert label[:, :5, 2].all() and label.sum() == SHAPE[0] * 5


def test_a_bad_select_expression_is_one_line_and_nothing_is_written(tmp_path):
    root = tmp_path / "archive"
    _write_rtstructs(root, _archive(root))
    out = tmp_path / "out"
    proc = medseg("import", "dicom", root, "--labels", "rtstruct", "--select", "(", "--out", out / "m.csv")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "--select '('" in line and "regular expression" in line
    assert not (out / "m.csv").exists()
    assert not any((out / "dicom_series").glob("*")) and not any((out / "labels").glob("*"))


def _export(tmp_path: Path, mask: np.ndarray, *extra: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """`medseg export-seg --multi-class` under a wrapper that reports the command's peak memory (MiB)."""
    import nibabel as nib

    folder, geometry = _archive(tmp_path / "archive")["good"]
    affine = read_volume(folder).affine
    nib.save(nib.Nifti1Image(mask.astype(np.int32), affine), str(tmp_path / "mask.nii.gz"))
    env = {**os.environ, "MEDSEG_SITE_SECRET": SECRET, "OMP_NUM_THREADS": "1"}
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print('peak_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(p.returncode)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "medseg.cli", "export-seg",
                           str(tmp_path / "mask.nii.gz"), "--reference", str(folder), "--out",
                           str(tmp_path / "o.dcm"), "--multi-class", *extra],
                          capture_output=True, text=True, env=env, timeout=300, check=False)  # fmt: skip
    peak = int(proc.stderr.rsplit("peak_kib", 1)[1].split()[0]) // 1024
    return proc, peak


def test_export_seg_multi_class_makes_one_segment_per_distinct_value(tmp_path):
    from medseg.dicom.seg_reader import read_dicom_seg

    mask = np.zeros(SHAPE, np.int32)
    mask[2:5, 2:5, 1:3] = 1_000_000
    mask[8:12, 6:9, 3:5] = 7
    proc, peak_mib = _export(tmp_path, mask)
    assert proc.returncode == 0, proc.stderr
    assert "2 segment(s)" in proc.stdout and peak_mib < 1500, (proc.stdout, peak_mib)
    geometry = read_volume(tmp_path / "archive" / "good" / "CT").geometry
    for value in (7, 1_000_000):
        back, labels = read_dicom_seg(tmp_path / "o.dcm", geometry, segments=f"class {value}$")
        np.testing.assert_array_equal(back, (mask == value).astype(np.uint8))
        assert labels == [f"lesion class {value}"]


def test_export_seg_refuses_more_than_255_segments_in_one_line(tmp_path):
    mask = np.arange(np.prod(SHAPE), dtype=np.int32).reshape(SHAPE)  # 1152 distinct values: an image
    proc, _ = _export(tmp_path, mask)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "mask.nii.gz" in line and f"{mask.size - 1} segments" in line and "at most 255" in line
    assert not (tmp_path / "o.dcm").exists() and leftovers(tmp_path) == []
