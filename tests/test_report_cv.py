"""The report's "Expected accuracy (cross-validation)" section, from hand-written CV files.

Six cases in three folds (two each) with known per-case numbers; the expectations (means,
medians, minutes) are worked out by hand below, not by medseg. No training, no images.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from medseg.report.html import ReportInputs, write_report

SECTION = "Expected accuracy (cross-validation)"

# chosen rule (model/cv_chosen): fold 0: Dice .9 .7 (mean .8), fold 1: .6 .8 (.7), fold 2: .5 .9 (.7)
# all cases: mean 4.4 / 6 = 0.7333, median (.7 + .8) / 2 = .75, min .5, max .9;
# HD95 2..12 -> mean 7.00 (folds 3, 7, 11); lesion F1 1 .5 .5 1 0 1 -> mean 0.667 (folds .75 .75 .5)
CHOSEN = {"dice": [0.9, 0.7, 0.6, 0.8, 0.5, 0.9], "hd95_mm": [2.0, 4.0, 6.0, 8.0, 10.0, 12.0],
          "lesion_f1": [1.0, 0.5, 0.5, 1.0, 0.0, 1.0]}  # fmt: skip
# plan rule (cv/): mean Dice 0.7, HD95 9.5 mm, lesion F1 0.6
PLAN = {"dice": [0.85, 0.65, 0.55, 0.75, 0.45, 0.95], "hd95_mm": [4.0, 6.0, 8.0, 10.0, 12.0, 17.0],
        "lesion_f1": [1.0, 0.5, 0.4, 0.8, 0.0, 0.9]}  # fmt: skip
FOLDS = [0, 0, 1, 1, 2, 2]
SECONDS = [120.0, 180.0, 270.0]  # 2, 3, 4.5 minutes
EPOCHS = [10, 12, 9]


def _cv_files(folder: Path, values: dict[str, list[float]]) -> None:
    """cv_table.csv (+ mean row) and cv_summary.json as medseg.auto.cross_validation writes them."""
    folder.mkdir(parents=True)
    rows = pd.DataFrame({"case_id": [f"case{i}" for i in range(6)], "patient_id": [f"p{i}" for i in range(6)],
                         "fold": FOLDS, "region": "lesion", **values})  # fmt: skip
    mean = {"case_id": "mean", "patient_id": "", "fold": -1, "region": "", **{k: sum(v) / 6 for k, v in values.items()}}
    pd.concat([rows, pd.DataFrame([mean])]).to_csv(folder / "cv_table.csv", index=False)
    ordered = {k: sorted(v) for k, v in values.items()}
    metrics = {k: {"mean": sum(v) / 6, "median": (v[2] + v[3]) / 2, "std": 0.1, "min": v[0], "max": v[-1], "n": 6, "n_nan": 0}
               for k, v in ordered.items()}  # fmt: skip
    per_fold = {str(k): {"n_cases": 2, **{m: (v[2 * k] + v[2 * k + 1]) / 2 for m, v in values.items()}} for k in range(3)}
    summary = {"what": "out-of-fold", "n_folds": 3, "n_cases": 6, "n_patients": 6, "metrics": metrics, "per_fold": per_fold,
               "fold_training_seconds": SECONDS, "fold_epochs": EPOCHS, "device": "cpu", "region": "lesion"}  # fmt: skip
    (folder / "cv_summary.json").write_text(json.dumps(summary), encoding="utf-8")


def _rule(threshold: float, min_mm3: float, fill: bool) -> dict:
    return {"threshold": threshold, "min_lesion_mm3": min_mm3, "min_component_fraction": 0.1, "fill_holes": fill,
            "largest_component": False}  # fmt: skip


REASON = "switched to threshold 0.35 + fill holes: mean Dice 0.7333 vs 0.7000 of the current rule"


def _model_files(model: Path) -> None:
    """postprocess.json + 14 candidates, the chosen one first and the current one 13th."""
    model.mkdir(parents=True)
    selection = {"chosen": _rule(0.35, 100.0, True), "current": _rule(0.5, 500.0, False), "reason": REASON, "n_cases": 6}
    (model / "postprocess.json").write_text(json.dumps(selection), encoding="utf-8")
    thresholds = [0.35, 0.3, 0.4, 0.45, 0.25, 0.55, 0.6, 0.2, 0.65, 0.7, 0.75, 0.8, 0.5, 0.85]
    candidates = pd.DataFrame({
        "threshold": thresholds, "min_lesion_mm3": [100.0] * 12 + [500.0, 100.0],
        "component_fraction": 0.1, "fill_holes": [True] + [False] * 13,
        "mean_dice": [0.7333 - 0.002 * i for i in range(14)], "mean_hd95_mm": 7.0, "n_hd95_undefined": 0,
        "is_current": [i == 12 for i in range(14)], "chosen": [i == 0 for i in range(14)],
    })  # fmt: skip
    candidates.to_csv(model / "postprocess_candidates.csv", index=False)
    _cv_files(model / "cv_chosen", CHOSEN)


def _test_eval(folder: Path) -> Path:
    """A minimal test-split evaluation (metrics_per_case.csv + summary.json)."""
    folder.mkdir(parents=True)
    pd.DataFrame({"case_id": ["t0", "t1"], "region": "lesion", "dice": [0.6, 0.8]}).to_csv(folder / "metrics_per_case.csv", index=False)
    summary = {"per_region": {"lesion": {"voxel": {"dice": {"mean": 0.7, "median": 0.7}}}}, "map": {}}
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder


class _Tables(HTMLParser):
    """Every <table id=...>: {"head": [...], "body": [[...]], "foot": [[...]]} (cell texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, list]] = {}
        self._table: dict[str, list] | None = None
        self._part = "body"
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table" and dict(attrs).get("id"):
            self._table = self.tables.setdefault(dict(attrs)["id"], {"head": [], "body": [], "foot": []})
        elif self._table is not None and tag in ("thead", "tbody", "tfoot"):
            self._part = {"thead": "head", "tbody": "body", "tfoot": "foot"}[tag]
        elif self._table is not None and tag == "tr" and self._part != "head":
            self._table[self._part].append([])
        elif self._table is not None and tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None and self._table is not None:
            text = "".join(self._cell)
            (self._table["head"] if self._part == "head" else self._table[self._part][-1]).append(text)
            self._cell = None


def _tables(text: str) -> dict[str, dict[str, list]]:
    parser = _Tables()
    parser.feed(text)
    return parser.tables


def _section(text: str, title: str) -> str:
    match = re.search(rf"<section><h2>{re.escape(title)}</h2>(.*?)</section>", text, re.S)
    assert match, f"no section {title!r}"
    return match.group(1)


def _h2s(text: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", text)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[str, Path]:
    """CV with the plan rule, the chosen rule's CV, the selection files and a test evaluation."""
    tmp = tmp_path_factory.mktemp("report_cv")
    _cv_files(tmp / "cv", PLAN)
    _model_files(tmp / "model")
    inputs = ReportInputs(title="cv report", cases=[], eval_dir=_test_eval(tmp / "evaluate"), cv_dir=tmp / "cv",
                          model_dir=tmp / "model")  # fmt: skip
    path = write_report(inputs, tmp / "report")
    return path.read_text(encoding="utf-8"), path.parent


def test_headline_uses_the_chosen_rule_and_states_the_plan_rule(full_report):
    text, _ = full_report
    section = _section(text, SECTION)
    assert ("Out-of-fold over 6 patients (3 folds): mean Dice <b>0.733</b> (median 0.750, 0.500–0.900), "
            "HD95 <b>7.00 mm</b>, lesion F1 <b>0.667</b> — each patient predicted by a model that did not train on it.") in section
    assert "the best validation epoch is not reported" in section
    assert "the same predictions score mean Dice 0.700, HD95 9.50 mm, lesion F1 0.600" in section
    assert "chosen on these same out-of-fold predictions" in section and "slightly optimistic" in section


def test_per_fold_table_has_the_fold_means_epochs_and_minutes(full_report):
    text, _ = full_report
    table = _tables(text)["cv_folds"]
    assert table["head"] == ["fold", "n_cases", "Dice", "HD95 (mm)", "lesion F1", "epochs", "training minutes"]
    assert table["body"] == [
        ["0", "2", "0.800", "3.000", "0.750", "10", "2.000"],
        ["1", "2", "0.700", "7.000", "0.750", "12", "3.000"],
        ["2", "2", "0.700", "11.000", "0.500", "9", "4.500"],
    ]


def test_per_case_table_keeps_the_mean_row_last(full_report):
    text, _ = full_report
    table = _tables(text)["cv_cases"]
    assert [row[0] for row in table["body"]] == [f"case{i}" for i in range(6)]
    assert [row[table["head"].index("dice")] for row in table["body"]] == ["0.9", "0.7", "0.6", "0.8", "0.5", "0.9"]
    assert len(table["foot"]) == 1 and table["foot"][0][0] == "mean"  # in <tfoot>: sorting leaves it last
    assert table["foot"][0][table["head"].index("dice")] == "0.7333"
    assert "chosen post-processing rule" in _section(text, SECTION)


def test_postprocess_decision_shows_both_rules_reason_and_candidates(full_report):
    text, _ = full_report
    section = _section(text, SECTION)
    assert "<h3>Post-processing chosen on cross-validation</h3>" in section
    assert REASON in section and "(scored on 6 cases)" in section
    rules = _tables(text)["cv_rules"]
    assert rules["head"] == ["rule", "threshold", "min_lesion_mm3", "min_component_fraction", "fill_holes", "largest_component"]
    assert rules["body"] == [["chosen", "0.35", "100", "0.1", "True", "False"], ["current", "0.5", "500", "0.1", "False", "False"]]
    candidates = _tables(text)["cv_candidates"]
    thresholds = [row[0] for row in candidates["body"]]
    # the 10 best by mean Dice, then the current rule (13th) — not the 11th, 12th or 14th
    assert thresholds == ["0.35", "0.3", "0.4", "0.45", "0.25", "0.55", "0.6", "0.2", "0.65", "0.7", "0.5"]
    current = candidates["body"][-1]
    assert current[candidates["head"].index("is_current")] == "True"


def test_cv_dice_plot_is_embedded(full_report):
    text, folder = full_report
    png = folder / "cv_dice.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _section(text, SECTION).count("data:image/png;base64,") == 1


def test_expected_accuracy_comes_after_dataset_and_before_the_test_metrics(full_report):
    text, _ = full_report
    assert _h2s(text) == ["Dataset", SECTION, "Metrics (test split)", "Provenance"]


def test_report_without_cv_has_no_such_section(tmp_path):
    inputs = ReportInputs(title="no cv", cases=[], eval_dir=_test_eval(tmp_path / "evaluate"))
    text = write_report(inputs, tmp_path / "report").read_text(encoding="utf-8")
    assert _h2s(text) == ["Dataset", "Metrics", "Provenance"]
    assert "cross-validation" not in text and not (tmp_path / "report" / "cv_dice.png").exists()


def test_plan_rule_only_is_not_called_optimistic(tmp_path):
    _cv_files(tmp_path / "cv", PLAN)
    text = write_report(ReportInputs(title="plan", cases=[], cv_dir=tmp_path / "cv"), tmp_path / "report").read_text()
    section = _section(text, SECTION)
    assert "mean Dice <b>0.700</b> (median 0.700, 0.450–0.950), HD95 <b>9.50 mm</b>, lesion F1 <b>0.600</b>" in section
    assert "optimistic" not in section and "Post-processing chosen" not in section
    assert "plan's post-processing rule" in section


def test_bootstrap_intervals_are_shown_when_the_summary_has_them(tmp_path):
    """cv_summary.json carries ``ci95`` per metric since the bootstrap intervals came in; older ones do not."""
    _cv_files(tmp_path / "cv", PLAN)
    _model_files(tmp_path / "model")
    for folder, dice_ci in ((tmp_path / "cv", [0.58, 0.81]), (tmp_path / "model" / "cv_chosen", [0.6217, 0.8333])):
        summary = json.loads((folder / "cv_summary.json").read_text())
        summary["metrics"]["dice"]["ci95"] = dice_ci
        summary["metrics"]["hd95_mm"]["ci95"] = [4.04, 9.96]
        (folder / "cv_summary.json").write_text(json.dumps(summary), encoding="utf-8")
    inputs = ReportInputs(title="ci", cases=[], cv_dir=tmp_path / "cv", model_dir=tmp_path / "model")
    section = _section(write_report(inputs, tmp_path / "report").read_text(encoding="utf-8"), SECTION)
    assert ("mean Dice <b>0.733</b> (95 % CI 0.622–0.833) (median 0.750, 0.500–0.900), "
            "HD95 <b>7.00 mm</b> (95 % CI 4.0–10.0), lesion F1 <b>0.667</b>") in section
    assert "the same predictions score mean Dice 0.700 (95 % CI 0.580–0.810), HD95 9.50 mm" in section
    assert "resampling the patients" in section
    assert "each patient predicted by a model that did not train on it" in section


def test_repeats_are_named_in_the_headline(tmp_path):
    _cv_files(tmp_path / "cv", PLAN)
    summary = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    (tmp_path / "cv" / "cv_summary.json").write_text(json.dumps({**summary, "repeats": 2}), encoding="utf-8")
    text = write_report(ReportInputs(title="repeats", cases=[], cv_dir=tmp_path / "cv"), tmp_path / "report").read_text()
    assert "each patient predicted by the average of 2 models (seeds) that did not train on it" in _section(text, SECTION)


def test_summaries_without_intervals_show_none(full_report):
    section = _section(full_report[0], SECTION)
    assert "95 % CI" not in section and "resampling the patients" not in section


@pytest.mark.parametrize("content", [
    b"case_id,fold,dice\ncase0,0,0.5\ncase1,0,0.4,9,9,9\n",  # ragged: pandas ParserError
    b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary junk",  # not a CSV
    b"",  # empty
    b"case_id,patient_id\ncase0,p0\n",  # no fold / dice columns
    b"case_id,fold,dice\ncase0,zero,0.5\nmean,-1,0.5\n",  # fold not a number
], ids=["ragged", "binary", "empty", "columns", "values"])  # fmt: skip
def test_corrupt_cv_table_drops_only_its_part(tmp_path, content):
    _cv_files(tmp_path / "cv", PLAN)
    _model_files(tmp_path / "model")
    for folder in (tmp_path / "cv", tmp_path / "model" / "cv_chosen"):
        (folder / "cv_table.csv").write_bytes(content)
    inputs = ReportInputs(title="corrupt", cases=[], cv_dir=tmp_path / "cv", model_dir=tmp_path / "model")
    text = write_report(inputs, tmp_path / "report").read_text(encoding="utf-8")
    section = _section(text, SECTION)
    assert "mean Dice <b>0.733</b>" in section and REASON in section
    assert "cv_cases" not in _tables(text) and "cv_folds" in _tables(text)
    assert "data:image/png" not in section


def test_corrupt_summary_and_selection_do_not_break_the_report(tmp_path):
    _cv_files(tmp_path / "cv", PLAN)
    _model_files(tmp_path / "model")
    (tmp_path / "cv" / "cv_summary.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "model" / "cv_chosen" / "cv_summary.json").write_text('{"metrics": [1, 2], "per_fold": 3}', encoding="utf-8")
    (tmp_path / "model" / "postprocess.json").write_text("[]", encoding="utf-8")
    inputs = ReportInputs(title="corrupt", cases=[], cv_dir=tmp_path / "cv", model_dir=tmp_path / "model")
    text = write_report(inputs, tmp_path / "report").read_text(encoding="utf-8")
    section = _section(text, SECTION)
    assert "Out-of-fold over" not in section and "Post-processing chosen" not in section
    assert "cv_cases" in _tables(text)  # the per-case table and plot still come from cv_chosen/cv_table.csv
    assert section.count("data:image/png;base64,") == 1
