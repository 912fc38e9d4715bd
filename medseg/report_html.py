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
"""

from __future__ import annotations

import base64
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medseg import atomic, reporting
from medseg.geometry import AXIS_INDEX
from medseg.manifest import Case
from medseg.outputs import (
    CANDIDATES_CHOICE,
    CANDIDATES_TABLE,
    CASE_STATS,
    CASES_COLUMNS,
    CASES_TABLE,
    CV_CHOSEN_DIR,
    CV_SUMMARY,
    CV_TABLE,
    EVAL_LESION_MATCHES,
    EVAL_PER_CASE,
    EVAL_PR_CURVE,
    EVAL_SUMMARY,
    INFERENCE_RECORD,
    LESION_CURVE,
    LESION_CURVE_PER_CASE,
    LESIONS_CSV_SUFFIX,
    POSTPROCESS_CANDIDATES,
    POSTPROCESS_RULE_KEYS,
    POSTPROCESS_SELECTION,
    QC_RECORD,
    REPORT_PAGE,
    SLICE_STATS,
    lesion_table_file,
    mask_file,
)

log = logging.getLogger(__name__)

N_TOP_CANDIDATES = 10  # candidate rules listed (plus the current and chosen ones)


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


def _read_csv(path: Path) -> pd.DataFrame | None:
    if path.is_file():
        try:
            return pd.read_csv(path, dtype={"case_id": str}, keep_default_na=True)
        except pd.errors.EmptyDataError:
            return None
    return None


def _read_csv_lenient(path: Path, required: tuple[str, ...]) -> pd.DataFrame | None:
    """``path`` as a table, or None when it is missing, unreadable or lacks ``required`` columns."""
    try:
        frame = _read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # pandas' ParserError is a ValueError
        log.warning("report: skipping unreadable %s (%s)", path, exc)
        return None
    if frame is None or not set(required) <= set(frame.columns):
        return None
    return frame


def _read_json(path: Path) -> dict[str, Any] | None:
    """``path`` as a JSON object, or None when it is missing, unreadable or not an object."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("report: skipping unreadable %s (%s)", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _num(value: Any, fmt: str = "{:.4f}") -> str:
    """A number for the page; ``n/a`` for missing/NaN (JSON null)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return fmt.format(value) if isinstance(value, (int, float)) else html.escape(str(value))


def _img_tag(png: Path, alt: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(frame: pd.DataFrame, table_id: str, float_format: str = "{:.4g}", footer: pd.DataFrame | None = None) -> str:
    """A sortable table (``DataFrame.to_html``; the page script makes its headers sort it).
    ``footer`` rows (same columns, e.g. a mean) go into ``<tfoot>`` and stay last when sorting."""
    def render(part: pd.DataFrame, **kwargs: Any) -> str:
        return part.to_html(index=False, border=0, na_rep="", escape=True, float_format=float_format.format, **kwargs)

    table = render(frame, table_id=table_id, classes="sortable")
    if footer is not None and len(footer):
        rows = render(footer[frame.columns]).split("<tbody>", 1)[1].split("</tbody>", 1)[0]
        table = table.replace("</table>", f"<tfoot>{rows}</tfoot></table>")
    return f'<div class="scroll">{table}</div>'


def _overview(inputs: ReportInputs, ref_cases: pd.DataFrame | None) -> str:
    n = len(inputs.cases)
    modalities = pd.Series([c.modality for c in inputs.cases]).value_counts().to_dict()
    splits = pd.Series([c.split or "unassigned" for c in inputs.cases]).value_counts().to_dict()
    channels = inputs.cases[0].channels if inputs.cases else []
    parts = [f"<p>{n} case(s); modalities {modalities}; splits {splits}; channels {channels}.</p>"]
    if ref_cases is not None and len(ref_cases):
        cols = [c for c in ("case_id", "modality", "split", "spacing_r", "spacing_a", "spacing_s", "n_slices", "n_lesions_3d",
                            "lesion_volume_ml", "largest_lesion_diameter_mm", "slices_with_lesion") if c in ref_cases.columns]
        summary = ref_cases[["n_lesions_3d", "lesion_volume_ml"]].describe().loc[["mean", "50%", "min", "max"]]
        parts.append(
            f"<p>Reference lesions: {int(ref_cases['n_lesions_3d'].sum())} in total; volume per case "
            f"mean {summary.loc['mean', 'lesion_volume_ml']:.2f} mL, median {summary.loc['50%', 'lesion_volume_ml']:.2f} mL.</p>"
        )
        parts.append(_table(ref_cases[cols], "overview"))
    return "".join(parts)


def _reference_curve_of(inputs: ReportInputs, case_ids: set[str], n_bins: int) -> pd.DataFrame | None:
    """The reference lesion-distribution curve over ``case_ids`` only (the predicted cases)."""
    from medseg.lesions import lesion_distribution_curve

    slices = _read_csv(inputs.ref_stats_dir / SLICE_STATS) if inputs.ref_stats_dir else None
    if slices is None or not case_ids:
        return None
    subset = slices[slices["case_id"].isin(case_ids)]
    return lesion_distribution_curve(subset, n_bins)[0] if len(subset) else None


def _pick_cases(metrics: pd.DataFrame) -> list[tuple[str, str]]:
    """Best, median and worst case ids by Dice (first region)."""
    region = metrics["region"].iloc[0]
    ranked = metrics[metrics["region"] == region].sort_values("dice", ascending=False, kind="stable")
    ranked = ranked[ranked["dice"].notna()]
    if ranked.empty:
        return []
    picks = [("best", ranked.iloc[0]["case_id"]), ("median", ranked.iloc[len(ranked) // 2]["case_id"]),
             ("worst", ranked.iloc[-1]["case_id"])]
    seen: set[str] = set()
    return [(k, c) for k, c in picks if not (c in seen or seen.add(c))]


def _overlay_png(case: Case, pred_dir: Path | None, axis: str, out: Path, title: str) -> Path | None:
    from medseg.geometry import to_ras
    from medseg.io import read_volume

    image = read_volume(case.images[case.channels[0]], check_finite=False)
    img_ras, affine = to_ras(image.array, image.affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    ref = pred = None
    if case.label is not None:
        ref = to_ras(read_volume(case.label).array > 0, image.affine)[0]
    mask_path = mask_file(pred_dir, case.case_id) if pred_dir else None
    if mask_path is not None and mask_path.is_file():
        pred = to_ras(read_volume(mask_path).array > 0, image.affine)[0]
    ax = AXIS_INDEX[axis]
    source = ref if ref is not None and ref.any() else pred
    others = tuple(a for a in range(3) if a != ax)
    index = int(np.argmax(source.sum(axis=others))) if source is not None and source.any() else img_ras.shape[ax] // 2
    take = lambda a: None if a is None else np.take(a, index, axis=ax)  # noqa: E731
    in_plane = tuple(float(spacing[a]) for a in others)
    return reporting.plot_overlay(take(img_ras), take(ref), take(pred), in_plane, out, f"{title} (slice {index})")  # type: ignore[arg-type]


def _metric(summary: dict[str, Any], name: str, stat: str = "mean") -> Any:
    info = summary.get("metrics", {}).get(name)
    return info.get(stat) if isinstance(info, dict) else None


def _cv_headline(summary: dict[str, Any], plan: dict[str, Any] | None) -> str:
    """The out-of-fold sentence from ``summary``; ``plan``: the plan-rule summary when ``summary``
    holds the chosen rule's numbers (then said to be chosen on the same predictions)."""
    dice = lambda stat: _num(_metric(summary, "dice", stat), "{:.3f}")  # noqa: E731
    text = (f"Out-of-fold over {_num(summary.get('n_patients'), '{:.0f}')} patients ({_num(summary.get('n_folds'), '{:.0f}')} folds): "
            f"mean Dice <b>{dice('mean')}</b>{_ci_text(summary, 'dice', '{:.3f}')} (median {dice('median')}, "
            f"{dice('min')}–{dice('max')}), "
            f"HD95 <b>{_num(_metric(summary, 'hd95_mm'), '{:.2f}')} mm</b>{_ci_text(summary, 'hd95_mm', '{:.1f}')}, "
            f"lesion F1 <b>{_num(_metric(summary, 'lesion_f1'), '{:.3f}')}</b> — each patient predicted by "
            f"{_predictor_text(summary.get('repeats'))} that did not train on it. This is the accuracy to expect on new "
            "patients from the same source; the best validation epoch is not reported.")
    parts = [f"<p class='headline'>{text}</p>"]
    if _metric(summary, "dice", "ci95"):
        parts.append("<p>The bracketed ranges are 95 % intervals from resampling the patients (bootstrap): "
                     "how far the mean could move on another set of patients of this size from the same source. "
                     "Narrow them with more patients, not more folds.</p>")
    n_cases, n_nan = summary.get("n_cases"), _metric(summary, "dice", "n_nan")
    parts.append(f"<p>{_num(n_cases, '{:.0f}')} case(s), region {html.escape(str(summary.get('region', 'n/a')))}, "
                 f"trained on {html.escape(str(summary.get('device', 'n/a')))}"
                 + (f"; Dice undefined in {n_nan} case(s)" if isinstance(n_nan, int) and n_nan else "") + ".</p>")
    if plan is not None:
        parts.append(
            "<p>These numbers use the post-processing rule chosen on cross-validation. With the plan's own rule "
            f"the same predictions score mean Dice {_num(_metric(plan, 'dice'), '{:.3f}')}"
            f"{_ci_text(plan, 'dice', '{:.3f}')}, "
            f"HD95 {_num(_metric(plan, 'hd95_mm'), '{:.2f}')} mm, lesion F1 {_num(_metric(plan, 'lesion_f1'), '{:.3f}')}. "
            "The rule was chosen on these same out-of-fold predictions, so the chosen-rule numbers are slightly "
            "optimistic.</p>")
    return "".join(parts)


def _predictor_text(repeats: Any) -> str:
    """What predicted each patient: a model, or the average of ``cv.repeats`` models."""
    return f"the average of {repeats} models (seeds)" if isinstance(repeats, int) and repeats > 1 else "a model"


def _ci_text(summary: dict[str, Any], name: str, fmt: str) -> str:
    """`` (95 % CI low–high)`` for a metric whose summary holds ``ci95``, else empty."""
    ci = _metric(summary, name, "ci95")
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return ""
    return f" (95 % CI {_num(ci[0], fmt)}–{_num(ci[1], fmt)})"


def _per_fold_table(summary: dict[str, Any], plan: dict[str, Any] | None) -> str:
    """fold, n_cases, Dice, HD95, lesion F1 (means over the fold's cases), epochs, training minutes."""
    per_fold = summary.get("per_fold")
    if not isinstance(per_fold, dict) or not per_fold:
        return ""
    timing = summary if "fold_training_seconds" in summary else (plan or {})
    seconds, epochs = timing.get("fold_training_seconds") or [], timing.get("fold_epochs") or []
    rows = []
    for key in sorted(per_fold, key=int):
        info, k = per_fold[key], int(key)
        sec = seconds[k] if k < len(seconds) else None
        rows.append({"fold": k, "n_cases": info.get("n_cases"), "Dice": info.get("dice", np.nan),
                     "HD95 (mm)": info.get("hd95_mm", np.nan), "lesion F1": info.get("lesion_f1", np.nan),
                     "epochs": epochs[k] if k < len(epochs) and epochs[k] is not None else "n/a",
                     "training minutes": sec / 60.0 if isinstance(sec, (int, float)) else np.nan})
    frame = pd.DataFrame(rows).astype({"Dice": float, "HD95 (mm)": float, "lesion F1": float, "training minutes": float})
    return "<h3>Per fold</h3>" + _table(frame, "cv_folds", "{:.3f}")


def _postprocess_part(model_dir: Path, out: Path) -> str:
    """The rule chosen on the out-of-fold predictions, the plan's rule, the reason, the
    candidates (the best :data:`N_TOP_CANDIDATES` by mean Dice, plus the current and chosen) and
    their Dice vs lesion F1 figure (written into ``out``)."""
    selection = _read_json(model_dir / POSTPROCESS_SELECTION)
    if selection is None:
        return ""
    parts = ["<h3>Post-processing chosen on cross-validation</h3>"]
    rules = [{"rule": name, **{k: selection[name].get(k, "n/a") for k in POSTPROCESS_RULE_KEYS}}
             for name in ("chosen", "current") if isinstance(selection.get(name), dict)]
    if rules:
        parts.append(_table(pd.DataFrame(rules), "cv_rules", "{:g}"))
    if selection.get("reason"):
        n = selection.get("n_cases")
        parts.append(f"<p class='reason'>{html.escape(str(selection['reason']))}"
                     + (f" (scored on {_num(n, '{:.0f}')} cases)" if n is not None else "") + "</p>")
    candidates = _read_csv_lenient(model_dir / POSTPROCESS_CANDIDATES, ("mean_dice",))
    if candidates is not None and len(candidates):
        ranked = candidates.sort_values("mean_dice", ascending=False, kind="stable")
        marked = np.zeros(len(ranked), bool)
        for flag in ("is_current", "chosen"):
            if flag in ranked.columns:
                marked |= ranked[flag].astype(str).str.lower().isin(("true", "1")).to_numpy()
        keep = np.arange(len(ranked)) < N_TOP_CANDIDATES
        shown = ranked[keep | marked]
        cols = [c for c in ("threshold", "min_lesion_mm3", "component_fraction", "fill_holes", "mean_dice", "mean_hd95_mm",
                            "n_hd95_undefined", "mean_lesion_f1", "is_current", "chosen") if c in shown.columns]
        extra = int((~keep & marked).sum())
        parts.append(f"<p>Candidates: the {min(N_TOP_CANDIDATES, len(ranked))} best of {len(ranked)} by mean Dice"
                     + (f", plus the current / chosen rule ({extra} row(s) below them)" if extra else "") + ".</p>")
        parts.append(_table(shown[cols], "cv_candidates"))
        if "mean_lesion_f1" in candidates.columns and np.isfinite(candidates["mean_lesion_f1"].to_numpy(float)).any():
            png = reporting.plot_postprocess_tradeoff(candidates, out / "postprocess_tradeoff.png")
            objective = selection.get("objective", "dice")
            parts.append(_img_tag(png, f"Dice against lesion F1 of the {len(candidates)} candidate rules "
                                       f"(chosen with objective {objective})"))
    return "".join(parts)


def _candidates_part(cv_dir: Path) -> str:
    """``cv.candidates``: the configuration chosen on the out-of-fold predictions, each step's
    reason (paired intervals) and every combination's scores (:mod:`medseg.candidates`'
    ``candidates.json`` / ``candidates_table.csv``)."""
    choice = _read_json(cv_dir / CANDIDATES_CHOICE)
    if choice is None:
        return ""
    parts = [f"<h3>Configuration chosen on cross-validation: {html.escape(str(choice.get('name', '')))}</h3><ul>"]
    parts += [f"<li>{html.escape(str(r))}</li>" for r in choice.get("reasons", [])]
    parts.append("</ul>")
    table = _read_csv_lenient(cv_dir / CANDIDATES_TABLE, ("combination", "mean_dice"))
    if table is not None and len(table):
        parts.append(_table(table, "cv_configurations"))
    return "".join(parts)


def _cv_section(inputs: ReportInputs, out: Path) -> str:
    """"Expected accuracy (cross-validation)": headline, per-fold and per-case tables, Dice plot,
    post-processing decision. Uses the chosen rule's out-of-fold numbers (``model_dir/cv_chosen``)
    when they exist, else the plan rule's (``cv_dir``). Each part whose files are missing or
    malformed is left out; returns "" when nothing can be shown."""
    plan = _read_json(inputs.cv_dir / CV_SUMMARY) if inputs.cv_dir else None
    chosen_dir = inputs.model_dir / CV_CHOSEN_DIR if inputs.model_dir else None
    chosen = _read_json(chosen_dir / CV_SUMMARY) if chosen_dir else None
    summary, source = (chosen, chosen_dir) if chosen is not None else (plan, inputs.cv_dir)
    table_dir = chosen_dir if chosen_dir is not None and (chosen_dir / CV_TABLE).is_file() else inputs.cv_dir
    table = _read_csv_lenient(table_dir / CV_TABLE, ("case_id", "fold", "dice")) if table_dir else None
    parts: list[str] = []
    guarded = (TypeError, ValueError, KeyError, AttributeError, IndexError)  # a malformed file drops its part only
    if summary is not None:
        for build, plan_arg in ((_cv_headline, plan if chosen is not None else None), (_per_fold_table, plan)):
            try:
                parts.append(build(summary, plan_arg))
            except guarded as exc:
                log.warning("report: skipping part of the cross-validation summary in %s (%s)", source, exc)
    elif inputs.cv_dir is not None:
        parts.append(f"<p>No readable {CV_SUMMARY} in {html.escape(str(inputs.cv_dir))}: no headline.</p>")
    if table is not None and len(table):
        try:
            is_mean = table["case_id"].astype(str) == "mean"
            cases = table[~is_mean].astype({"fold": int, "dice": float})
            if len(cases):
                png = reporting.plot_cv_dice(cases, out / "cv_dice.png")
                parts.append(_img_tag(png, "Out-of-fold Dice per case, coloured by fold (black line: mean over cases)"))
            rule = "the chosen post-processing rule" if table_dir == chosen_dir else "the plan's post-processing rule"
            parts.append(f"<h3>Per case</h3><p>Out-of-fold predictions with {rule}; last row: mean over cases.</p>"
                         + _table(cases, "cv_cases", footer=table[is_mean]))
        except guarded as exc:
            log.warning("report: skipping %s (%s)", table_dir, exc)
    if inputs.cv_dir is not None:
        try:
            parts.append(_candidates_part(inputs.cv_dir))
        except guarded as exc:
            log.warning("report: skipping the candidates in %s (%s)", inputs.cv_dir, exc)
    if inputs.model_dir is not None:
        try:
            parts.append(_postprocess_part(inputs.model_dir, out))
        except guarded as exc:
            log.warning("report: skipping the post-processing selection in %s (%s)", inputs.model_dir, exc)
    return "".join(parts)


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
    table = _read_csv_lenient(inputs.pred_dir / CASES_TABLE, ("case_id", "n_lesions", "total_volume_ml"))
    if table is not None and len(table):
        return table[[c for c in CASES_COLUMNS if c in table.columns]], f"predictions/{CASES_TABLE}"
    rows = []
    for case in inputs.cases:
        lesions = _read_csv_lenient(lesion_table_file(inputs.pred_dir, case.case_id), ("volume_ml",))
        if lesions is not None:  # header only: no lesion; missing or unreadable: the case is left out
            volumes = pd.to_numeric(lesions["volume_ml"], errors="coerce").dropna()
            rows.append({"case_id": case.case_id, "n_lesions": len(volumes), "total_volume_ml": float(volumes.sum()),
                         "largest_volume_ml": float(volumes.max()) if len(volumes) else 0.0})
    if rows:
        return pd.DataFrame(rows), f"the per-case lesion tables (<case>{LESIONS_CSV_SUFFIX})"
    stats = _read_csv_lenient(inputs.pred_stats_dir / CASE_STATS, ("case_id", "n_lesions_3d", "lesion_volume_ml")) \
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
            f"{_num(float(volume.median()) if volume.notna().any() else None, '{:.2f}')} mL per case")
    if 0 < with_lesion < len(table):
        line += f" ({_num(float(volume[n_lesions > 0].median()), '{:.2f}')} mL over the cases with lesions)"
    return (f"<p class='headline'>{line}.</p><p>One row per predicted case (from {html.escape(source)}); "
            "click a column header to sort.</p>" + _table(table, "predicted_cases", "{:.4g}"))


def _review_section(inputs: ReportInputs) -> str:
    """"Review first": the predicted cases the QC calibration flags (``qc_flag`` of ``cases.csv``),
    most doubtful first, with what the cross-validation measured (``inference.json``'s ``qc``);
    when the calibration found no useful relation (or there is none), it says so and flags
    nothing. "" when the cases carry no QC score."""
    if inputs.pred_dir is None:
        return ""
    table = _read_csv_lenient(inputs.pred_dir / CASES_TABLE, ("case_id", "qc_score"))
    if table is None or not len(table):
        return ""
    record = (_read_json(inputs.pred_dir / INFERENCE_RECORD) or {}).get("qc")
    record = record if isinstance(record, dict) else None
    table = table.sort_values("qc_score", ascending=False, kind="stable")
    columns = [c for c in ("case_id", "qc_score", "n_lesions", "total_volume_ml") if c in table.columns]
    if record is None:
        return ("<p>No calibration of the QC score: the model is not a model folder with a cross-validation "
                f"(<code>{QC_RECORD}</code>), so no case is flagged. Cases by QC score (the model's doubt, higher = more):</p>"
                + _table(table[columns], "qc_scores", "{:.4g}"))
    measured = (f"on the cross-validation ({record.get('n_cases')} cases) the score ranked the out-of-fold Dice with "
                f"Spearman &rho; = {_num(record.get('spearman'), '{:.2f}')}")
    ci = record.get("ci95")
    if isinstance(ci, list) and len(ci) == 2:
        measured += f" (95 % CI {_num(ci[0], '{:.2f}')} to {_num(ci[1], '{:.2f}')})"
    if not record.get("useful"):
        return (f"<p class='headline'>No case is flagged: {measured}, which is no reliable relation between the "
                "model's doubt and its accuracy.</p><p>Cases by QC score, for information:</p>"
                + _table(table[columns], "qc_scores", "{:.4g}"))
    flagged = table[table.get("qc_flag").astype(str).str.lower() == "true"] if "qc_flag" in table.columns else table.iloc[:0]
    caught = record.get("worst_caught")
    line = (f"{len(flagged)} of {len(table)} case(s) flagged for review (QC score &ge; "
            f"{_num(record.get('threshold'), '{:.3g}')}): {measured}; flagging the top "
            f"{_num(100 * float(record.get('flag_share', 0.1)), '{:.0f}')} % caught "
            f"{_num(100 * float(caught) if caught is not None else None, '{:.0f}')} % of the worst cases there.")
    body = _table(flagged[columns], "review_first", "{:.4g}") if len(flagged) else "<p>No case reaches the threshold.</p>"
    return f"<p class='headline'>{line}</p>{body}"


def _identity_line(provenance: dict[str, Any]) -> str:
    """The model in one line: architecture / encoder, checkpoint sha256 prefix(es), the
    cross-validated Dice with its 95 % interval when the model folder holds it; "" when the run
    names no checkpoint (no model ran: the config's network is only a default then)."""
    identity = provenance.get("model_identity") if isinstance(provenance.get("model_identity"), dict) else {}
    shas = [str(c.get("sha256")) for c in identity.get("checkpoints") or [] if isinstance(c, dict) and c.get("sha256")]
    if not shas:  # a run recorded before model_identity
        shas = [str(provenance["checkpoint_sha256"])] if provenance.get("checkpoint_sha256") else \
            [str(v) for v in (provenance.get("model_checkpoints_sha256") or {}).values()]  # fmt: skip
    if not shas:
        return ""
    parts = []
    model = (provenance.get("config") or {}).get("model") if isinstance(provenance.get("config"), dict) else None
    if isinstance(model, dict) and model.get("arch"):
        from medseg.model_names import model_name

        parts.append(model_name(str(model["arch"]), str(model.get("encoder")), model.get("options")))
    if len(shas) == 1:
        parts.append(f"checkpoint sha256 {shas[0][:12]}")
    else:
        parts.append(f"{len(shas)} checkpoints, sha256 {', '.join(s[:12] for s in shas[:3])}" + (", ..." if len(shas) > 3 else ""))
    cv = identity.get("cv_accuracy") if isinstance(identity.get("cv_accuracy"), dict) else {}
    if isinstance(cv.get("dice_mean"), (int, float)):
        ci = cv.get("dice_ci95")
        interval = f" (95 % CI {_num(ci[0], '{:.3f}')}–{_num(ci[1], '{:.3f}')})" if isinstance(ci, list) and len(ci) == 2 else ""
        parts.append(f"CV Dice {cv['dice_mean']:.3f}{interval}")
    return " · ".join(parts)


def _provenance_section(provenance: dict[str, Any]) -> str:
    """The model's identity in one visible line; the run's whole record (configuration as run,
    versions, checkpoints, timings) folded in a closed ``<details>``."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td><pre>"
                   f"{html.escape(v if isinstance(v, str) else json.dumps(v, indent=1, default=str))}</pre></td></tr>"
                   for k, v in provenance.items())  # fmt: skip
    identity = _identity_line(provenance)
    note = ("<p>The configuration below is the one inference used: the model's preprocessing, network, training "
            "and inference settings, with this run's overrides on top.</p>") if provenance.get("model_identity") else ""
    summary = f"Model: {html.escape(identity)} — configuration and provenance" if identity else "Configuration and provenance"
    return f"{note}<details class='prov'><summary>{summary}</summary><table class='prov'>{rows}</table></details>"


def write_report(inputs: ReportInputs, out_dir: str | Path) -> Path:
    """Write ``report.html`` and its PNGs into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, str]] = []
    ref_cases = _read_csv(inputs.ref_stats_dir / CASE_STATS) if inputs.ref_stats_dir else None
    sections.append(("Dataset", _overview(inputs, ref_cases)))
    has_cv = inputs.cv_dir is not None or inputs.model_dir is not None
    cv_part = _cv_section(inputs, out) if has_cv else ""
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
    ref_curve = _read_csv(inputs.ref_stats_dir / LESION_CURVE) if inputs.ref_stats_dir else None
    pred_curve = _read_csv(inputs.pred_stats_dir / LESION_CURVE) if inputs.pred_stats_dir else None
    if ref_curve is not None and len(ref_curve):
        per_case = _read_csv(inputs.ref_stats_dir / LESION_CURVE_PER_CASE)  # type: ignore[operator]
        png = reporting.plot_lesion_curve(ref_curve, out / "lesion_curve_reference.png", inputs.axis, inputs.extent, per_case,
                                          title="Reference lesion distribution")
        curves.append(_img_tag(png, "Reference lesions: area per slice along the normalised axis"))
    if pred_curve is not None and len(pred_curve):
        per_case = _read_csv(inputs.pred_stats_dir / LESION_CURVE_PER_CASE)  # type: ignore[operator]
        same_cases = _reference_curve_of(inputs, set(per_case["case_id"]) if per_case is not None else set(), len(pred_curve))
        if same_cases is not None and len(same_cases):
            title, caption = ("Predicted vs reference lesion distribution (same cases)",
                              "Predicted lesions (red) against the reference mean (dashed)")
        else:  # no reference for these cases: the predictions alone
            same_cases = None
            title, caption = "Predicted lesion distribution", "Predicted lesions: area per slice along the normalised axis"
        png = reporting.plot_lesion_curve(pred_curve, out / "lesion_curve_predicted.png", inputs.axis, inputs.extent, per_case,
                                          title=title, reference=same_cases, label="predicted lesion area")
        curves.append(_img_tag(png, caption))
    if curves:
        sections.append(("Lesion-distribution curves", "".join(curves)))

    # evaluation
    metrics = _read_csv(inputs.eval_dir / EVAL_PER_CASE) if inputs.eval_dir else None
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
                f"<li><b>{html.escape(region)}</b>: mean Dice {_num(dice.get('mean'))} (median {_num(dice.get('median'))}), "
                f"global Dice {_num(voxel.get('global_dice'))}, HD95 mean {_num(hd.get('mean'), '{:.2f}')} mm; "
                f"lesion precision {_num(pooled.get('precision'), '{:.3f}')}, recall {_num(pooled.get('recall'), '{:.3f}')}, "
                f"F1 {_num(pooled.get('f1'), '{:.3f}')}</li>"
            )
        m = summary.get("map", {})
        thresholds = m.get("iou_thresholds") or []
        lines.append(f"<li>mAP at the matching IoU: {_num(m.get('at_iou_threshold'), '{:.3f}')}; mean over IoU thresholds "
                     f"{thresholds}: {_num(m.get('mean_over_thresholds'), '{:.3f}')} "
                     f"(detection scores: {html.escape(str(summary.get('score_source')))})</li>")
        title = "Metrics (test split)" if inputs.cv_dir is not None else "Metrics"
        sections.append((title, f"<ul>{''.join(lines)}</ul>" + _table(metrics[cols], "metrics")))
        figures = []
        pr = _read_csv(inputs.eval_dir / EVAL_PR_CURVE)  # type: ignore[operator]
        cfg = summary.get("config", {}).get("evaluation", {})
        thr = float(cfg.get("iou_threshold", 0.5))
        if pr is not None:
            ap = {region: info.get("detection", {}).get("ap", {}).get(str(thr), float("nan"))
                  for region, info in summary.get("per_region", {}).items()}
            ap = {k: (v if isinstance(v, (int, float)) else float("nan")) for k, v in ap.items()}
            figures.append(_img_tag(reporting.plot_pr_curves(pr, ap, out / "pr_curve.png", thr), "Precision-recall of lesion detection"))
        matches = _read_csv(inputs.eval_dir / EVAL_LESION_MATCHES)  # type: ignore[operator]
        if matches is not None and len(matches):
            edges = tuple(cfg.get("size_edges_mm3", (500.0, 5000.0)))
            figures.append(_img_tag(reporting.plot_lesion_sizes(matches, out / "lesion_sizes.png", edges), "Lesion volumes"))
        first_region = next(iter(summary.get("per_region", {}).values()), {})
        by_size = first_region.get("lesion", {}).get("recall_by_size")
        if by_size:
            figures.append(_img_tag(reporting.plot_recall_by_size(by_size, out / "recall_by_size.png"), "Detection recall by lesion size"))
        if figures:
            sections.append(("Detection", "".join(figures)))
        overlays = []
        by_id = {c.case_id: c for c in inputs.cases}
        for kind, case_id in _pick_cases(metrics):
            if case_id in by_id:
                png = _overlay_png(by_id[case_id], inputs.pred_dir, inputs.axis, out / f"overlay_{kind}.png", f"{kind}: {case_id}")
                if png is not None:
                    overlays.append(_img_tag(png, f"{kind} case {case_id}: reference green, prediction red"))
        if overlays:
            sections.append(("Slice overlays (largest reference lesion slice)", "".join(overlays)))
    elif inputs.pred_dir is not None and inputs.cases:
        overlays = []
        predicted = [c for c in inputs.cases if mask_file(inputs.pred_dir, c.case_id).is_file()]
        for case in predicted[:3]:
            png = _overlay_png(case, inputs.pred_dir, inputs.axis, out / f"overlay_{case.case_id}.png", case.case_id)
            if png is not None:
                overlays.append(_img_tag(png, f"{case.case_id}: prediction red"))
        if overlays:
            sections.append(("Slice overlays", "".join(overlays)))

    sections.append(("Provenance", _provenance_section(inputs.provenance)))
    return write_page(out / REPORT_PAGE, inputs.title, sections)


def write_page(path: Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write one report page: ``title`` and one ``<section>`` per (heading, HTML) pair, with the
    page's style and its table-sorting script (shared by every medseg report)."""
    body = "".join(f"<section><h2>{html.escape(heading)}</h2>{content}</section>" for heading, content in sections)
    return atomic.write_text(path, _PAGE.replace("{{title}}", html.escape(title)).replace("{{body}}", body))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h3{font-size:1.1em;margin-top:1.2em}p.headline{font-size:1.05em}
tfoot td{font-weight:bold;border-top:2px solid #999}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}th,td{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f3f3f3;cursor:pointer}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5em;vertical-align:top}figure img{max-width:560px;border:1px solid #eee}
figcaption{font-size:.8em;color:#555;max-width:560px}pre{margin:0;text-align:left;white-space:pre-wrap;font-size:.8em}
table.prov{width:100%}table.prov td{text-align:left}.scroll{overflow-x:auto;max-width:100%}
details.prov summary{cursor:pointer;padding:.3em 0}
</style>
<script>
function sortTable(id, col){
  const table=document.getElementById(id), body=table.tBodies[0];
  const rows=Array.from(body.rows), asc=table.dataset.sortCol==col && table.dataset.sortDir!='asc';
  rows.sort((a,b)=>{const x=a.cells[col].textContent, y=b.cells[col].textContent;
    const nx=parseFloat(x), ny=parseFloat(y);
    const c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y); return asc?c:-c;});
  rows.forEach(r=>body.appendChild(r)); table.dataset.sortCol=col; table.dataset.sortDir=asc?'asc':'desc';
}
document.addEventListener('DOMContentLoaded',()=>document.querySelectorAll('table.sortable').forEach(t=>
  t.querySelectorAll('thead th').forEach((th,i)=>th.addEventListener('click',()=>sortTable(t.id,i)))));
</script></head>
<body><h1>{{title}}</h1>{{body}}</body></html>
"""
