"""The HTML report: one self-contained page (PNG figures embedded) plus the PNG files.

Sections: dataset overview; expected accuracy from cross-validation (out-of-fold headline,
per-fold and per-case tables, Dice per case by fold, and the post-processing rule chosen on the
out-of-fold predictions with its candidates); predicted cases (the cohort table of ``medseg
infer``, one sortable row per predicted case, with a one-line cohort summary);
lesion-distribution curves (reference, and predicted against the reference of the same cases;
"Predicted lesion distribution" alone when no case has a reference); metrics per case
(sortable) and summary (titled "Metrics (test split)" when the cross-validation section is
there too); lesion sizes, precision-recall curve with AP, detection recall by size; slice
overlays of the best / median / worst cases; provenance (the model's identity in one line, the
configuration inference used and the rest of the run's record folded in a ``<details>``).
Every section is built from files the earlier stages wrote (CSV/JSON/NIfTI), so the report can
be rebuilt alone. A missing or unreadable cross-validation / post-processing file only drops
its part of the page, never the report. Only manifest case ids appear; nothing is read from
DICOM headers.

The page is assembled here; :mod:`medseg.report.files` reads the run's files (leniently),
:mod:`medseg.report.cv` builds the cross-validation section, :mod:`medseg.report.overlays` reads
the volumes and draws the slice overlays, and :mod:`medseg.report.page` holds the page pieces
every report shares.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from medseg.manifest import Case
from medseg.outputs import (
    CASE_STATS,
    CASES_COLUMNS,
    CASES_TABLE,
    EVAL_LESION_MATCHES,
    EVAL_PER_CASE,
    EVAL_PR_CURVE,
    EVAL_SUMMARY,
    INFERENCE_RECORD,
    LESION_CURVE,
    LESION_CURVE_PER_CASE,
    LESIONS_CSV_SUFFIX,
    QC_RECORD,
    REPORT_PAGE,
    SLICE_STATS,
    lesion_table_file,
    mask_file,
)
from medseg.report import plots as reporting
from medseg.report.cv import cv_section
from medseg.report.files import read_csv, read_csv_lenient, read_json
from medseg.report.overlays import overlay_png, pick_cases
from medseg.report.page import img_tag, num, overview, provenance_section, sortable_table, write_page

__all__ = ["ReportInputs", "predicted_cases_table", "write_page", "write_report"]  # write_page: re-exported

@dataclass
class ReportInputs:
    """Folders written by the stages; any of them may be None (its sections are skipped)."""

    title: str
    cases: list[Case]
    ref_stats_dir: Path | None = None
    pred_stats_dir: Path | None = None
    eval_dir: Path | None = None
    pred_dir: Path | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    axis: str = "axial"
    extent: str = "foreground"
    cv_dir: Path | None = None  # cross-validation output (cv_table.csv, cv_summary.json)
    model_dir: Path | None = None  # model folder (postprocess.json, candidates, cv_chosen/)


def _reference_curve_of(inputs: ReportInputs, case_ids: set[str], n_bins: int) -> pd.DataFrame | None:
    """The reference lesion-distribution curve over ``case_ids`` only (the predicted cases)."""
    from medseg.stats.lesions import lesion_distribution_curve

    slices = read_csv(inputs.ref_stats_dir / SLICE_STATS) if inputs.ref_stats_dir else None
    if slices is None or not case_ids:
        return None
    subset = slices[slices["case_id"].isin(case_ids)]
    return lesion_distribution_curve(subset, n_bins)[0] if len(subset) else None


def predicted_cases_table(inputs: ReportInputs) -> tuple[pd.DataFrame, str] | None:
    """One row per predicted case (columns: those of :data:`CASES_COLUMNS` the source has) and
    where the rows come from; None when there is nothing to show.

    Sources, first found: ``medseg infer``'s cohort table (:data:`CASES_TABLE` in the prediction
    folder); the per-case lesion tables of the manifest's cases (:func:`lesion_table_file`: one row
    per lesion, ``volume_ml``; runs from before the cohort table); the prediction statistics'
    ``case_stats.csv`` (3-D components of the masks). The last two have no ``dicom_seg`` and no
    ``slices_with_lesion`` (the cohort table counts slices along the model's axis, the statistics
    along ``stats.axis``). A case without lesions has a largest volume of 0.
    """
    if inputs.pred_dir is None:
        return None
    table = read_csv_lenient(inputs.pred_dir / CASES_TABLE, ("case_id", "n_lesions", "total_volume_ml"))
    if table is not None and len(table):
        return table[[c for c in CASES_COLUMNS if c in table.columns]], f"predictions/{CASES_TABLE}"
    rows = []
    for case in inputs.cases:
        lesions = read_csv_lenient(lesion_table_file(inputs.pred_dir, case.case_id), ("volume_ml",))
        if lesions is not None:  # header only: no lesion; missing or unreadable: the case is left out
            volumes = pd.to_numeric(lesions["volume_ml"], errors="coerce").dropna()
            rows.append({"case_id": case.case_id, "n_lesions": len(volumes), "total_volume_ml": float(volumes.sum()),
                         "largest_volume_ml": float(volumes.max()) if len(volumes) else 0.0})
    if rows:
        return pd.DataFrame(rows), f"the per-case lesion tables (<case>{LESIONS_CSV_SUFFIX})"
    stats = read_csv_lenient(inputs.pred_stats_dir / CASE_STATS, ("case_id", "n_lesions_3d", "lesion_volume_ml")) \
        if inputs.pred_stats_dir else None  # fmt: skip
    if stats is not None and len(stats):
        frame = pd.DataFrame({"case_id": stats["case_id"], "n_lesions": stats["n_lesions_3d"],
                              "total_volume_ml": stats["lesion_volume_ml"]})
        if "largest_lesion_volume_ml" in stats.columns:
            frame["largest_volume_ml"] = stats["largest_lesion_volume_ml"].fillna(0.0)
        return frame, "the prediction statistics (3-D components of the masks)"
    return None


def _predicted_cases_section(inputs: ReportInputs) -> str:
    """"Predicted cases": the cohort line (cases, cases with lesions, median total volume) and the
    sortable per-case table (:func:`predicted_cases_table`); "" when there is none."""
    found = predicted_cases_table(inputs)
    if found is None:
        return ""
    table, source = found
    n_lesions = pd.to_numeric(table["n_lesions"], errors="coerce")
    volume = pd.to_numeric(table["total_volume_ml"], errors="coerce")
    with_lesion = int((n_lesions > 0).sum())
    line = (f"{len(table)} case(s) predicted, {with_lesion} with at least one lesion; median total lesion volume "
            f"{num(float(volume.median()) if volume.notna().any() else None, '{:.2f}')} mL per case")
    if 0 < with_lesion < len(table):
        line += f" ({num(float(volume[n_lesions > 0].median()), '{:.2f}')} mL over the cases with lesions)"
    return (f"<p class='headline'>{line}.</p><p>One row per predicted case (from {html.escape(source)}); "
            "click a column header to sort.</p>" + sortable_table(table, "predicted_cases", "{:.4g}"))


def _review_section(inputs: ReportInputs) -> str:
    """"Review first": the predicted cases the QC calibration flags (``qc_flag`` of ``cases.csv``),
    most doubtful first, with what the cross-validation measured (``inference.json``'s ``qc``);
    when the calibration found no useful relation (or there is none), it says so and flags
    nothing. "" when the cases carry no QC score."""
    if inputs.pred_dir is None:
        return ""
    table = read_csv_lenient(inputs.pred_dir / CASES_TABLE, ("case_id", "qc_score"))
    if table is None or not len(table):
        return ""
    record = (read_json(inputs.pred_dir / INFERENCE_RECORD) or {}).get("qc")
    record = record if isinstance(record, dict) else None
    table = table.sort_values("qc_score", ascending=False, kind="stable")
    columns = [c for c in ("case_id", "qc_score", "n_lesions", "total_volume_ml") if c in table.columns]
    if record is None:
        return ("<p>No calibration of the QC score: the model is not a model folder with a cross-validation "
                f"(<code>{QC_RECORD}</code>), so no case is flagged. Cases by QC score (the model's doubt, higher = more):</p>"
                + sortable_table(table[columns], "qc_scores", "{:.4g}"))
    measured = (f"on the cross-validation ({record.get('n_cases')} cases) the score ranked the out-of-fold Dice with "
                f"Spearman &rho; = {num(record.get('spearman'), '{:.2f}')}")
    ci = record.get("ci95")
    if isinstance(ci, list) and len(ci) == 2:
        measured += f" (95 % CI {num(ci[0], '{:.2f}')} to {num(ci[1], '{:.2f}')})"
    if not record.get("useful"):
        return (f"<p class='headline'>No case is flagged: {measured}, which is no reliable relation between the "
                "model's doubt and its accuracy.</p><p>Cases by QC score, for information:</p>"
                + sortable_table(table[columns], "qc_scores", "{:.4g}"))
    flagged = table[table.get("qc_flag").astype(str).str.lower() == "true"] if "qc_flag" in table.columns else table.iloc[:0]
    caught = record.get("worst_caught")
    line = (f"{len(flagged)} of {len(table)} case(s) flagged for review (QC score &ge; "
            f"{num(record.get('threshold'), '{:.3g}')}): {measured}; flagging the top "
            f"{num(100 * float(record.get('flag_share', 0.1)), '{:.0f}')} % caught "
            f"{num(100 * float(caught) if caught is not None else None, '{:.0f}')} % of the worst cases there.")
    body = sortable_table(flagged[columns], "review_first", "{:.4g}") if len(flagged) else "<p>No case reaches the threshold.</p>"
    return f"<p class='headline'>{line}</p>{body}"


def write_report(inputs: ReportInputs, out_dir: str | Path) -> Path:
    """Write ``report.html`` and its PNGs into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, str]] = []
    ref_cases = read_csv(inputs.ref_stats_dir / CASE_STATS) if inputs.ref_stats_dir else None
    sections.append(("Dataset", overview(inputs.cases, ref_cases)))
    has_cv = inputs.cv_dir is not None or inputs.model_dir is not None
    cv_part = cv_section(inputs.cv_dir, inputs.model_dir, out) if has_cv else ""
    if cv_part:
        sections.append(("Expected accuracy (cross-validation)", cv_part))

    cohort = _predicted_cases_section(inputs)
    if cohort:
        sections.append(("Predicted cases", cohort))
    review = _review_section(inputs)
    if review:
        sections.append(("Review first", review))

    # lesion-distribution curves
    curves = []
    ref_curve = read_csv(inputs.ref_stats_dir / LESION_CURVE) if inputs.ref_stats_dir else None
    pred_curve = read_csv(inputs.pred_stats_dir / LESION_CURVE) if inputs.pred_stats_dir else None
    if ref_curve is not None and len(ref_curve):
        per_case = read_csv(inputs.ref_stats_dir / LESION_CURVE_PER_CASE)  # type: ignore[operator]
        png = reporting.plot_lesion_curve(ref_curve, out / "lesion_curve_reference.png", inputs.axis, inputs.extent, per_case,
                                          title="Reference lesion distribution")
        curves.append(img_tag(png, "Reference lesions: area per slice along the normalised axis"))
    if pred_curve is not None and len(pred_curve):
        per_case = read_csv(inputs.pred_stats_dir / LESION_CURVE_PER_CASE)  # type: ignore[operator]
        same_cases = _reference_curve_of(inputs, set(per_case["case_id"]) if per_case is not None else set(), len(pred_curve))
        if same_cases is not None and len(same_cases):
            title, caption = ("Predicted vs reference lesion distribution (same cases)",
                              "Predicted lesions (red) against the reference mean (dashed)")
        else:  # no reference for these cases: the predictions alone
            same_cases = None
            title, caption = "Predicted lesion distribution", "Predicted lesions: area per slice along the normalised axis"
        png = reporting.plot_lesion_curve(pred_curve, out / "lesion_curve_predicted.png", inputs.axis, inputs.extent, per_case,
                                          title=title, reference=same_cases, label="predicted lesion area")
        curves.append(img_tag(png, caption))
    if curves:
        sections.append(("Lesion-distribution curves", "".join(curves)))

    # evaluation
    metrics = read_csv(inputs.eval_dir / EVAL_PER_CASE) if inputs.eval_dir else None
    summary_path = inputs.eval_dir / EVAL_SUMMARY if inputs.eval_dir else None
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path and summary_path.is_file() else None
    if metrics is not None and len(metrics) and summary is not None:
        cols = [c for c in ("case_id", "region", "dice", "iou", "precision", "recall", "hd95_mm", "assd_mm", "ref_volume_ml",
                            "pred_volume_ml", "rel_volume_diff", "lesion_n_ref", "lesion_n_pred", "lesion_f1", "empty")
                if c in metrics.columns]
        lines = []
        for region, info in summary.get("per_region", {}).items():
            voxel = info.get("voxel", {})
            dice = voxel.get("dice", {})
            hd = voxel.get("hd95_mm", {})
            pooled = info.get("lesion", {}).get("pooled", {})
            lines.append(
                f"<li><b>{html.escape(region)}</b>: mean Dice {num(dice.get('mean'))} (median {num(dice.get('median'))}), "
                f"global Dice {num(voxel.get('global_dice'))}, HD95 mean {num(hd.get('mean'), '{:.2f}')} mm; "
                f"lesion precision {num(pooled.get('precision'), '{:.3f}')}, recall {num(pooled.get('recall'), '{:.3f}')}, "
                f"F1 {num(pooled.get('f1'), '{:.3f}')}</li>"
            )
        m = summary.get("map", {})
        thresholds = m.get("iou_thresholds") or []
        lines.append(f"<li>mAP at the matching IoU: {num(m.get('at_iou_threshold'), '{:.3f}')}; mean over IoU thresholds "
                     f"{thresholds}: {num(m.get('mean_over_thresholds'), '{:.3f}')} "
                     f"(detection scores: {html.escape(str(summary.get('score_source')))})</li>")
        title = "Metrics (test split)" if inputs.cv_dir is not None else "Metrics"
        sections.append((title, f"<ul>{''.join(lines)}</ul>" + sortable_table(metrics[cols], "metrics")))
        figures = []
        pr = read_csv(inputs.eval_dir / EVAL_PR_CURVE)  # type: ignore[operator]
        cfg = summary.get("config", {}).get("evaluation", {})
        thr = float(cfg.get("iou_threshold", 0.5))
        if pr is not None:
            ap = {region: info.get("detection", {}).get("ap", {}).get(str(thr), float("nan"))
                  for region, info in summary.get("per_region", {}).items()}
            ap = {k: (v if isinstance(v, (int, float)) else float("nan")) for k, v in ap.items()}
            figures.append(img_tag(reporting.plot_pr_curves(pr, ap, out / "pr_curve.png", thr), "Precision-recall of lesion detection"))
        matches = read_csv(inputs.eval_dir / EVAL_LESION_MATCHES)  # type: ignore[operator]
        if matches is not None and len(matches):
            edges = tuple(cfg.get("size_edges_mm3", (500.0, 5000.0)))
            figures.append(img_tag(reporting.plot_lesion_sizes(matches, out / "lesion_sizes.png", edges), "Lesion volumes"))
        first_region = next(iter(summary.get("per_region", {}).values()), {})
        by_size = first_region.get("lesion", {}).get("recall_by_size")
        if by_size:
            figures.append(img_tag(reporting.plot_recall_by_size(by_size, out / "recall_by_size.png"), "Detection recall by lesion size"))
        if figures:
            sections.append(("Detection", "".join(figures)))
        overlays = []
        by_id = {c.case_id: c for c in inputs.cases}
        for kind, case_id in pick_cases(metrics):
            if case_id in by_id:
                png = overlay_png(by_id[case_id], inputs.pred_dir, inputs.axis, out / f"overlay_{kind}.png", f"{kind}: {case_id}")
                if png is not None:
                    overlays.append(img_tag(png, f"{kind} case {case_id}: reference green, prediction red"))
        if overlays:
            sections.append(("Slice overlays (largest reference lesion slice)", "".join(overlays)))
    elif inputs.pred_dir is not None and inputs.cases:
        overlays = []
        predicted = [c for c in inputs.cases if mask_file(inputs.pred_dir, c.case_id).is_file()]
        for case in predicted[:3]:
            png = overlay_png(case, inputs.pred_dir, inputs.axis, out / f"overlay_{case.case_id}.png", case.case_id)
            if png is not None:
                overlays.append(img_tag(png, f"{case.case_id}: prediction red"))
        if overlays:
            sections.append(("Slice overlays", "".join(overlays)))

    sections.append(("Provenance", provenance_section(inputs.provenance)))
    return write_page(out / REPORT_PAGE, inputs.title, sections)
