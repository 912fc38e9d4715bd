"""The record of what ran and the cohort report: `pipelines/infer_report.yaml` with a checkpoint
whose stored settings differ from the defaults over an unlabelled manifest (config.yaml,
provenance.json and the report show the checkpoint's config; a resumed run redoes nothing), the
report's "Predicted cases" table from each of its sources, and the page in a headless browser."""

from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
from html.parser import HTMLParser

import pandas as pd
import pytest
import yaml
from browser import open_in_browser
from conftest import REPO, artifact_path, relocated_manifest, save_tiny_checkpoint
from PIL import Image

from medseg.cli import main
from medseg.config import Config
from medseg.manifest import read_manifest
from medseg.outputs import CASES_COLUMNS, CASES_TABLE, lesion_table_file
from medseg.report.html import ReportInputs, predicted_cases_table, write_report
from medseg.stats.dataset import compute_dataset_stats, write_dataset_stats

STORED = {"min_lesion_mm3": 90.0, "fill_holes": True}  # the checkpoint's inference settings (defaults: 10, false)


@pytest.fixture(scope="module")
def hospital_run(tmp_path_factory, phantom_manifest):
    """Three phantoms without labels, a tiny U-Net checkpoint (arch/encoder unet, STORED
    settings) and one infer_report run with a user override (connectivity 6)."""
    tmp = tmp_path_factory.mktemp("cohort")
    labelled = phantom_manifest(3, (40, 36, 12), seed=6)
    # a hospital manifest: no labels, no splits
    manifest = relocated_manifest(labelled, tmp / "data" / "hospital.csv", label="", split="")
    checkpoint = save_tiny_checkpoint(tmp / "model.pt", ["flair", "t1"], "MR", inference=STORED)
    run_dir = tmp / "run"
    args = ["run", str(REPO / "pipelines" / "infer_report.yaml"), "--set", f"pipeline.checkpoint={checkpoint}",
            "--set", f"pipeline.manifest={manifest}", "--set", "inference.connectivity=6", "--out", str(run_dir),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    return run_dir, args, checkpoint, read_manifest(manifest)


class _TableReader(HTMLParser):
    """The header and body cells (text) of the table with id ``table_id``."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id, self.inside, self.part, self.cell = table_id, False, "", None
        self.header: list[str] = []
        self.rows: list[list[str]] = []

    def handle_starttag(self, tag, attrs):
        if tag == "table" and dict(attrs).get("id") == self.table_id:
            self.inside = True
        elif self.inside and tag in ("thead", "tbody", "tfoot"):
            self.part = tag
        elif self.inside and tag == "tr" and self.part == "tbody":
            self.rows.append([])
        elif self.inside and tag in ("th", "td"):
            self.cell = ""

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def handle_endtag(self, tag):
        if self.inside and tag in ("th", "td") and self.cell is not None:
            (self.header if self.part == "thead" else self.rows[-1]).append(self.cell.strip())
            self.cell = None
        elif tag == "table":
            self.inside = False


def _html_table(page: str, table_id: str) -> pd.DataFrame:
    """The table ``table_id`` of ``page`` with its cells as text."""
    reader = _TableReader(table_id)
    reader.feed(page)
    assert reader.header, f"no table {table_id}"
    return pd.DataFrame(reader.rows, columns=reader.header)


def _report_config(page: str) -> dict:
    """The configuration the report shows (the ``config`` row of its provenance table)."""
    found = re.search(r"<tr><th>config</th><td><pre>(.*?)</pre>", page, re.S)
    assert found, "no config row in the report"
    return json.loads(html.unescape(found.group(1)))


def test_run_records_the_config_inference_used(hospital_run):
    run_dir, _, checkpoint, _ = hospital_run
    ran = json.loads((run_dir / "predictions" / "inference.json").read_text())["inference"]
    assert ran["min_lesion_mm3"] == 90.0 and ran["fill_holes"] is True  # the checkpoint's
    assert ran["connectivity"] == 6 and ran["write_prob"] is True  # the user's --set, the stage option
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["inference"] == ran
    assert (config["model"]["arch"], config["model"]["encoder"]) == ("unet", "unet")  # not the default unet_inception
    assert config["model"]["in_channels"] == 6 and config["preprocess"]["context_slices"] == 1

    provenance = json.loads((run_dir / "provenance.json").read_text())
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert provenance["model_identity"]["checkpoints"] == [{"file": str(checkpoint), "sha256": sha}]
    assert provenance["model_identity"]["model_folder"] is None

    page = (run_dir / "report" / "report.html").read_text()
    shown = _report_config(page)
    assert shown["inference"] == ran and shown["model"] == config["model"]
    summary = re.search(r"<summary>(.*?)</summary>", page, re.S).group(1)
    assert "unet / unet" in summary and f"checkpoint sha256 {sha[:12]}" in summary


def test_resumed_run_redoes_nothing_and_keeps_the_record(hospital_run, capsys):
    run_dir, args, _, _ = hospital_run
    before = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("up to date") == 4  # validate, infer, prediction_stats, report
    assert all(v["runs"] == 1 for v in json.loads((run_dir / "state.json").read_text()).values())
    assert (run_dir / "config.yaml").read_text() == before  # restored, not the pipeline's default config
    assert yaml.safe_load(before)["inference"]["min_lesion_mm3"] == 90.0


def test_unlabelled_report_lists_the_predicted_cases_without_a_reference(hospital_run):
    run_dir, _, _, cases = hospital_run
    page = (run_dir / "report" / "report.html").read_text()
    assert "<h2>Predicted cases</h2>" in page
    table = _html_table(page, "predicted_cases")
    assert sorted(table["case_id"]) == sorted(c.case_id for c in cases)
    for case in cases:  # the counts are those of each case's lesion table
        lesions = pd.read_csv(lesion_table_file(run_dir / "predictions", case.case_id))
        row = table[table["case_id"] == case.case_id].iloc[0]
        assert int(row["n_lesions"]) == len(lesions)
        assert float(row["total_volume_ml"]) == pytest.approx(lesions["volume_ml"].sum(), rel=1e-3, abs=1e-4)
    assert f"{len(cases)} case(s) predicted" in page
    assert "Predicted vs reference" not in page and "reference mean" not in page
    curve = Image.open(run_dir / "report" / "lesion_curve_predicted.png")
    assert curve.info["Title"] == "Predicted lesion distribution"
    assert "reference" not in curve.info["Description"] and "mean predicted lesion area" in curve.info["Description"]
    assert "<details class='prov'>" in page and "<details open" not in page


# --------------------------------------------------------------------------- the table's sources


@pytest.fixture(scope="module")
def phantoms(phantom_manifest):
    return read_manifest(phantom_manifest(3, (40, 36, 12), seed=2))


def _write_lesion_table(pred, case_id, volumes):
    pd.DataFrame({"lesion_id": range(1, len(volumes) + 1), "voxels": [int(v * 1000) for v in volumes],
                  "volume_ml": volumes}).to_csv(lesion_table_file(pred, case_id), index=False)  # fmt: skip


def test_table_from_the_lesion_tables_when_there_is_no_cohort_table(phantoms, tmp_path):
    cases = phantoms
    pred = tmp_path / "pred"
    pred.mkdir()
    _write_lesion_table(pred, cases[0].case_id, [0.5, 1.5])
    _write_lesion_table(pred, cases[1].case_id, [])  # header only: no lesion
    # cases[2]: no lesion table (not predicted): left out
    table, source = predicted_cases_table(ReportInputs("t", cases, pred_dir=pred))
    assert "lesion tables" in source
    assert table.to_dict("records") == [
        {"case_id": cases[0].case_id, "n_lesions": 2, "total_volume_ml": 2.0, "largest_volume_ml": 1.5},
        {"case_id": cases[1].case_id, "n_lesions": 0, "total_volume_ml": 0.0, "largest_volume_ml": 0.0},
    ]
    page = write_report(ReportInputs("t", cases, pred_dir=pred), tmp_path / "report").read_text()
    # median of the totals 2.0 and 0.0; 2.0 over the one case with lesions
    assert "2 case(s) predicted, 1 with at least one lesion; median total lesion volume 1.00 mL per case (2.00 mL" in page


def test_table_from_the_cohort_table_of_medseg_infer(phantoms, tmp_path):
    cases = phantoms
    pred = tmp_path / "pred"
    pred.mkdir()
    _write_lesion_table(pred, cases[0].case_id, [9.0])  # the cohort table wins over the lesion tables
    cohort = pd.DataFrame([[cases[0].case_id, 1, 0.5, 0.5, 3, 0.2, None, "written"],
                           [cases[1].case_id, 0, 0.0, 0.0, 0, 0.0, None, "not asked"],
                           [cases[2].case_id, 2, 1.25, 1.0, 5, 0.4, None, "written (new frame of reference)"]],
                          columns=list(CASES_COLUMNS))  # fmt: skip
    cohort.to_csv(pred / CASES_TABLE, index=False)
    table, source = predicted_cases_table(ReportInputs("t", cases, pred_dir=pred))
    assert source == f"predictions/{CASES_TABLE}" and list(table.columns) == list(CASES_COLUMNS)
    page = write_report(ReportInputs("t", cases, pred_dir=pred), tmp_path / "report").read_text()
    shown = _html_table(page, "predicted_cases")
    assert shown["dicom_seg"].tolist() == cohort["dicom_seg"].tolist()
    assert shown["slices_with_lesion"].tolist() == ["3", "0", "5"]
    assert "3 case(s) predicted, 2 with at least one lesion; median total lesion volume 0.50 mL per case" in page


def test_table_from_the_prediction_statistics_and_the_reference_curve_kept(phantoms, tmp_path):
    """Masks only (no lesion tables): the table from the prediction statistics; with the
    reference statistics the predicted curve is still drawn against them."""
    cases = phantoms
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in cases:
        shutil.copy(case.label, pred / f"{case.case_id}_mask.nii.gz")
    cfg = Config()
    from medseg.stats.dataset import prediction_cases

    write_dataset_stats(compute_dataset_stats(cases, cfg, progress=False), cfg, tmp_path / "stats")
    stats = compute_dataset_stats(prediction_cases(cases, pred), cfg, progress=False)
    write_dataset_stats(stats, cfg, tmp_path / "pred_stats")
    inputs = ReportInputs("t", cases, tmp_path / "stats", tmp_path / "pred_stats", pred_dir=pred)
    table, source = predicted_cases_table(inputs)
    assert "prediction statistics" in source
    expected = pd.read_csv(tmp_path / "pred_stats" / "case_stats.csv", dtype={"case_id": str})
    assert table["n_lesions"].tolist() == expected["n_lesions_3d"].tolist()
    write_report(inputs, tmp_path / "report")
    curve = Image.open(tmp_path / "report" / "lesion_curve_predicted.png")
    assert curve.info["Title"] == "Predicted vs reference lesion distribution (same cases)"
    assert "reference mean" in curve.info["Description"]


def test_identity_line_names_the_cross_validated_accuracy(phantoms, tmp_path):
    cases = phantoms
    provenance = {"config": {"model": {"arch": "deeplabv3plus", "encoder": "resnet18"}},
                  "model_identity": {"checkpoints": [{"file": "fold_0.pt", "sha256": "a" * 64},
                                                     {"file": "fold_1.pt", "sha256": "b" * 64}],
                                     "cv_accuracy": {"dice_mean": 0.8384, "dice_ci95": [0.79, 0.881]}}}  # fmt: skip
    page = write_report(ReportInputs("t", cases, provenance=provenance), tmp_path / "report").read_text()
    summary = re.search(r"<summary>(.*?)</summary>", page, re.S).group(1)
    assert summary.startswith("Model: deeplabv3plus / resnet18 · 2 checkpoints, sha256 aaaaaaaaaaaa, bbbbbbbbbbbb · "
                              "CV Dice 0.838 (95 % CI 0.790–0.881)")
    # no checkpoint in the record (a statistics-only run): the config's network is no model that ran
    page = write_report(ReportInputs("t", cases, provenance={"config": provenance["config"]}), tmp_path / "r2").read_text()
    assert re.search(r"<summary>(.*?)</summary>", page, re.S).group(1) == "Configuration and provenance"


# --------------------------------------------------------------------------- in a browser


PAGE_CHECK = """
const table = document.getElementById('predicted_cases');
const col = Array.from(table.tHead.rows[0].cells).findIndex(c => c.textContent.trim() === 'n_lesions');
table.tHead.rows[0].cells[col].click();  // the page's sort: first click sorts descending
const details = Array.from(document.querySelectorAll('details'));
return {
  rows: table.tBodies[0].rows.length,
  sorted: Array.from(table.tBodies[0].rows).map(r => parseFloat(r.cells[col].textContent)),
  details: details.map(d => d.open),
  configShown: details.some(d => Array.from(d.querySelectorAll('pre')).some(p => p.checkVisibility())),
  detailsHeight: details.map(d => d.getBoundingClientRect().height),
  summary: details.length ? details[0].querySelector('summary').textContent : '',
  captions: Array.from(document.querySelectorAll('figcaption')).map(f => f.textContent),
};
"""


def test_cohort_report_in_headless_chromium(hospital_run, tmp_path):
    run_dir, _, _, cases = hospital_run
    shot = artifact_path(tmp_path, "cohort_report.png")
    images, logs, page = open_in_browser(run_dir / "report" / "report.html", shot, PAGE_CHECK)
    assert page["rows"] == len(cases)
    assert page["sorted"] == sorted(page["sorted"], reverse=True)
    assert page["details"] == [False] and not page["configShown"]  # the record is folded away
    assert page["detailsHeight"][0] < 80  # one summary line, not a screen-long dump
    assert page["summary"].startswith("Model: unet / unet · checkpoint sha256 ")
    assert page["captions"] and not any("reference" in c for c in page["captions"])
    assert images and all(complete and width > 0 for complete, width in images), images
    errors = [entry for entry in logs if entry.get("level") == "SEVERE"]
    assert not errors, errors


@pytest.mark.parametrize("useful", [True, False])
def test_review_first_lists_the_flagged_cases_or_says_why_none(phantoms, tmp_path, useful):
    import json

    cases = phantoms
    pred = tmp_path / "pred"
    pred.mkdir()
    rows = [[c.case_id, 1, 0.5, 0.5, 3, score, (score >= 0.3) if useful else None, "not asked"]
            for c, score in zip(cases, (0.1, 0.35, 0.5), strict=True)]
    pd.DataFrame(rows, columns=list(CASES_COLUMNS)).to_csv(pred / CASES_TABLE, index=False)
    qc = {"useful": useful, "spearman": -0.62 if useful else -0.1, "ci95": [-0.85, -0.2] if useful else [-0.6, 0.45],
          "threshold": 0.3, "flag_share": 0.1, "worst_caught": 1.0, "n_cases": 12}
    (pred / "inference.json").write_text(json.dumps({"qc": qc}))
    page = write_report(ReportInputs("t", cases, pred_dir=pred), tmp_path / "report").read_text()
    assert "<h2>Review first</h2>" in page
    if useful:
        assert "2 of 3 case(s) flagged for review" in page
        assert sorted(_html_table(page, "review_first")["case_id"]) == sorted(c.case_id for c in cases[1:])
    else:
        assert "No case is flagged" in page and "no reliable relation" in page and 'id="review_first"' not in page
