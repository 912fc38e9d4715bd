"""The CSV tables medseg writes keep the digits their measurement supports (issue 36, point 5):
mm to 0.01, mm^3 to 0.1, mL to 0.0001, Dice and other fractions to 4 digits; ids and counts as
they are; scores (AP ranking) to 6 significant digits."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import save_tiny_checkpoint

from medseg.atomic import write_csv
from medseg.manifest import read_manifest
from medseg.outputs import MASK_SUFFIX
from medseg.rounding import column_rule, round_table


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m medseg.cli ARGS`` (one OpenMP thread), output captured as text."""
    return subprocess.run([sys.executable, "-m", "medseg.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, check=False)  # fmt: skip


def decimals(text: str) -> int:
    """Digits after the point of one CSV field as written ("81.85" -> 2, "3" -> 0, "1e-05" -> 5)."""
    if "e" in text.lower():
        mantissa, exponent = text.lower().split("e")
        return max(0, decimals(mantissa) - int(exponent))
    return len(text.split(".")[1]) if "." in text else 0


def most_decimals(path: Path, column: str) -> int:
    """The most digits after the point in ``column`` of the CSV file ``path`` (text, not parsed floats)."""
    with path.open(newline="") as fh:
        return max(decimals(row[column]) for row in csv.DictReader(fh) if row[column] not in ("", "nan"))


def test_the_rule_by_column_name():
    frame = pd.DataFrame({
        "case_id": ["a", "b"], "lesion_id": [1, 2], "voxels": [321, 45], "matched": [True, False],
        "hd95_mm": [81.84700000000001, np.nan], "volume_mm3": [1002.1641095613772, 163.44], "volume_ml": [1.0021641095, 0.1],
        "dice": [0.92505353319, 1.0], "score_mean": [0.5226084123, 0.9], "mean": [0.69619195651234, 0.1 + 0.2],
        "centroid_x_ras_mm": [-0.0004, 12.3456]})  # fmt: skip
    rounded = round_table(frame)
    assert rounded.loc[0, "hd95_mm"] == 81.85 and np.isnan(rounded.loc[1, "hd95_mm"])
    assert rounded["volume_mm3"].tolist() == [1002.2, 163.4] and rounded.loc[0, "volume_ml"] == 1.0022
    assert rounded.loc[0, "dice"] == 0.9251 and rounded.loc[0, "score_mean"] == 0.522608
    assert rounded["mean"].tolist() == [0.6962, 0.3] and rounded["centroid_x_ras_mm"].tolist() == [0.0, 12.35]
    for column in ("case_id", "lesion_id", "voxels", "matched"):  # ids, counts, flags untouched
        assert rounded[column].tolist() == frame[column].tolist() and rounded[column].dtype == frame[column].dtype
    assert frame.loc[0, "hd95_mm"] == 81.84700000000001  # the caller's frame is not changed
    assert column_rule("lr") == ("significant", 10) and column_rule("qc_score") == ("significant", 6)


def test_write_csv_writes_no_float_noise(tmp_path):
    text = write_csv(tmp_path / "t.csv", pd.DataFrame({"hd95_mm": [81.84700000000001], "x": [0.1 + 0.2]})).read_text()
    assert text == "hd95_mm,x\n81.85,0.3\n"


@pytest.fixture(scope="module")
def phantoms(phantom_manifest) -> Path:
    return phantom_manifest(3, (48, 44, 12), seed=2, val_fraction=0.34, test_fraction=0)


def test_stats_and_evaluation_tables_are_rounded(phantoms, tmp_path):
    stats = tmp_path / "stats"
    proc = run_cli("stats", phantoms, "--out", stats, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    case_stats = stats / "case_stats.csv"
    assert most_decimals(case_stats, "lesion_volume_ml") <= 4 and most_decimals(case_stats, "largest_lesion_diameter_mm") <= 2
    assert most_decimals(case_stats, "spacing_r") <= 4 and most_decimals(stats / "slice_stats.csv", "lesion_area_mm2") <= 2
    assert most_decimals(stats / "lesion_curve.csv", "mean") <= 4
    assert pd.read_csv(case_stats)["lesion_voxels"].dtype.kind == "i"  # counts stay integers

    pred = tmp_path / "pred"  # each reference shifted by one voxel: Dice, HD95 and volumes that are not round
    pred.mkdir()
    for case in read_manifest(phantoms):
        label = nib.load(str(case.label))
        nib.save(nib.Nifti1Image(np.roll(np.asarray(label.dataobj), 1, axis=0), label.affine), str(pred / f"{case.case_id}{MASK_SUFFIX}"))
    out = tmp_path / "eval"
    proc = run_cli("evaluate", "--pred", pred, "--manifest", phantoms, "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    per_case = out / "metrics_per_case.csv"
    assert most_decimals(per_case, "dice") <= 4 and most_decimals(per_case, "hd95_mm") <= 2
    assert most_decimals(per_case, "ref_volume_ml") <= 4 and most_decimals(out / "lesion_matches.csv", "volume_mm3") <= 1
    assert pd.read_csv(per_case)["dice"].between(0.01, 0.9999).all()  # really rounded values, not 0 or 1


def test_inference_tables_are_rounded(phantoms, tmp_path, monkeypatch):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pt", ["flair", "t1"], inference={"min_lesion_mm3": 0.0})
    out = tmp_path / "inf"
    proc = run_cli("infer", "--checkpoint", checkpoint, "--manifest", phantoms, "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    cases = out / "cases.csv"
    assert pd.read_csv(cases)["n_lesions"].gt(0).all()  # an untrained model marks about half the volume
    assert most_decimals(cases, "total_volume_ml") <= 4 and most_decimals(cases, "largest_volume_ml") <= 4
    for table in out.glob("*_lesions.csv"):
        assert most_decimals(table, "volume_ml") <= 4 and most_decimals(table, "max_inplane_diameter_mm") <= 2
        assert most_decimals(table, "centroid_x_ras_mm") <= 2
