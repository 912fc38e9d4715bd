"""The report's "Expected accuracy (cross-validation)" section: the out-of-fold headline (with its
bootstrap intervals), the per-fold and per-case tables, the Dice plot, the configuration chosen on
``cv.candidates`` and the post-processing rule chosen on the out-of-fold predictions with its
candidates. Built from the files of the ``cv`` and ``postprocess`` stages; a missing or malformed
file drops its part only."""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medseg.outputs import (
    CANDIDATES_CHOICE,
    CANDIDATES_TABLE,
    CV_CHOSEN_DIR,
    CV_SUMMARY,
    CV_TABLE,
    POSTPROCESS_CANDIDATES,
    POSTPROCESS_RULE_KEYS,
    POSTPROCESS_SELECTION,
)
from medseg.report import plots as reporting
from medseg.report.files import read_csv_lenient, read_json
from medseg.report.page import img_tag, num, sortable_table

log = logging.getLogger(__name__)

N_TOP_CANDIDATES = 10  # candidate rules listed (plus the current and chosen ones)


def _metric(summary: dict[str, Any], name: str, stat: str = "mean") -> Any:
    info = summary.get("metrics", {}).get(name)
    return info.get(stat) if isinstance(info, dict) else None


def _cv_headline(summary: dict[str, Any], plan: dict[str, Any] | None) -> str:
    """The out-of-fold sentence from ``summary``; ``plan``: the plan-rule summary when ``summary``
    holds the chosen rule's numbers (then said to be chosen on the same predictions)."""
    dice = lambda stat: num(_metric(summary, "dice", stat), "{:.3f}")  # noqa: E731
    text = (f"Out-of-fold over {num(summary.get('n_patients'), '{:.0f}')} patients ({num(summary.get('n_folds'), '{:.0f}')} folds): "
            f"mean Dice <b>{dice('mean')}</b>{_ci_text(summary, 'dice', '{:.3f}')} (median {dice('median')}, "
            f"{dice('min')}–{dice('max')}), "
            f"HD95 <b>{num(_metric(summary, 'hd95_mm'), '{:.2f}')} mm</b>{_ci_text(summary, 'hd95_mm', '{:.1f}')}, "
            f"lesion F1 <b>{num(_metric(summary, 'lesion_f1'), '{:.3f}')}</b> — each patient predicted by "
            f"{_predictor_text(summary.get('repeats'))} that did not train on it. This is the accuracy to expect on new "
            "patients from the same source; the best validation epoch is not reported.")
    parts = [f"<p class='headline'>{text}</p>"]
    if _metric(summary, "dice", "ci95"):
        parts.append("<p>The bracketed ranges are 95 % intervals from resampling the patients (bootstrap): "
                     "how far the mean could move on another set of patients of this size from the same source. "
                     "Narrow them with more patients, not more folds.</p>")
    n_cases, n_nan = summary.get("n_cases"), _metric(summary, "dice", "n_nan")
    parts.append(f"<p>{num(n_cases, '{:.0f}')} case(s), region {html.escape(str(summary.get('region', 'n/a')))}, "
                 f"trained on {html.escape(str(summary.get('device', 'n/a')))}"
                 + (f"; Dice undefined in {n_nan} case(s)" if isinstance(n_nan, int) and n_nan else "") + ".</p>")
    if plan is not None:
        parts.append(
            "<p>These numbers use the post-processing rule chosen on cross-validation. With the plan's own rule "
            f"the same predictions score mean Dice {num(_metric(plan, 'dice'), '{:.3f}')}"
            f"{_ci_text(plan, 'dice', '{:.3f}')}, "
            f"HD95 {num(_metric(plan, 'hd95_mm'), '{:.2f}')} mm, lesion F1 {num(_metric(plan, 'lesion_f1'), '{:.3f}')}. "
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
    return f" (95 % CI {num(ci[0], fmt)}–{num(ci[1], fmt)})"


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
    return "<h3>Per fold</h3>" + sortable_table(frame, "cv_folds", "{:.3f}")


def _postprocess_part(model_dir: Path, out: Path) -> str:
    """The rule chosen on the out-of-fold predictions, the plan's rule, the reason, the
    candidates (the best :data:`N_TOP_CANDIDATES` by mean Dice, plus the current and chosen) and
    their Dice vs lesion F1 figure (written into ``out``)."""
    selection = read_json(model_dir / POSTPROCESS_SELECTION)
    if selection is None:
        return ""
    parts = ["<h3>Post-processing chosen on cross-validation</h3>"]
    rules = [{"rule": name, **{k: selection[name].get(k, "n/a") for k in POSTPROCESS_RULE_KEYS}}
             for name in ("chosen", "current") if isinstance(selection.get(name), dict)]
    if rules:
        parts.append(sortable_table(pd.DataFrame(rules), "cv_rules", "{:g}"))
    if selection.get("reason"):
        n = selection.get("n_cases")
        parts.append(f"<p class='reason'>{html.escape(str(selection['reason']))}"
                     + (f" (scored on {num(n, '{:.0f}')} cases)" if n is not None else "") + "</p>")
    candidates = read_csv_lenient(model_dir / POSTPROCESS_CANDIDATES, ("mean_dice",))
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
        parts.append(sortable_table(shown[cols], "cv_candidates"))
        if "mean_lesion_f1" in candidates.columns and np.isfinite(candidates["mean_lesion_f1"].to_numpy(float)).any():
            png = reporting.plot_postprocess_tradeoff(candidates, out / "postprocess_tradeoff.png")
            objective = selection.get("objective", "dice")
            parts.append(img_tag(png, f"Dice against lesion F1 of the {len(candidates)} candidate rules "
                                       f"(chosen with objective {objective})"))
    return "".join(parts)


def candidates_part(cv_dir: Path) -> str:
    """``cv.candidates``: the configuration chosen on the out-of-fold predictions, each step's
    reason (paired intervals) and every combination's scores (:mod:`medseg.auto.candidates`'
    ``candidates.json`` / ``candidates_table.csv``)."""
    choice = read_json(cv_dir / CANDIDATES_CHOICE)
    if choice is None:
        return ""
    parts = [f"<h3>Configuration chosen on cross-validation: {html.escape(str(choice.get('name', '')))}</h3><ul>"]
    parts += [f"<li>{html.escape(str(r))}</li>" for r in choice.get("reasons", [])]
    parts.append("</ul>")
    table = read_csv_lenient(cv_dir / CANDIDATES_TABLE, ("combination", "mean_dice"))
    if table is not None and len(table):
        parts.append(sortable_table(table, "cv_configurations"))
    return "".join(parts)


def cv_section(cv_dir: Path | None, model_dir: Path | None, out: Path) -> str:
    """"Expected accuracy (cross-validation)": headline, per-fold and per-case tables, Dice plot,
    post-processing decision. Uses the chosen rule's out-of-fold numbers (``model_dir/cv_chosen``)
    when they exist, else the plan rule's (``cv_dir``). Each part whose files are missing or
    malformed is left out; returns "" when nothing can be shown."""
    plan = read_json(cv_dir / CV_SUMMARY) if cv_dir else None
    chosen_dir = model_dir / CV_CHOSEN_DIR if model_dir else None
    chosen = read_json(chosen_dir / CV_SUMMARY) if chosen_dir else None
    summary, source = (chosen, chosen_dir) if chosen is not None else (plan, cv_dir)
    table_dir = chosen_dir if chosen_dir is not None and (chosen_dir / CV_TABLE).is_file() else cv_dir
    table = read_csv_lenient(table_dir / CV_TABLE, ("case_id", "fold", "dice")) if table_dir else None
    parts: list[str] = []
    guarded = (TypeError, ValueError, KeyError, AttributeError, IndexError)  # a malformed file drops its part only
    if summary is not None:
        for build, plan_arg in ((_cv_headline, plan if chosen is not None else None), (_per_fold_table, plan)):
            try:
                parts.append(build(summary, plan_arg))
            except guarded as exc:
                log.warning("report: skipping part of the cross-validation summary in %s (%s)", source, exc)
    elif cv_dir is not None:
        parts.append(f"<p>No readable {CV_SUMMARY} in {html.escape(str(cv_dir))}: no headline.</p>")
    if table is not None and len(table):
        try:
            is_mean = table["case_id"].astype(str) == "mean"
            cases = table[~is_mean].astype({"fold": int, "dice": float})
            if len(cases):
                png = reporting.plot_cv_dice(cases, out / "cv_dice.png")
                parts.append(img_tag(png, "Out-of-fold Dice per case, coloured by fold (black line: mean over cases)"))
            rule = "the chosen post-processing rule" if table_dir == chosen_dir else "the plan's post-processing rule"
            parts.append(f"<h3>Per case</h3><p>Out-of-fold predictions with {rule}; last row: mean over cases.</p>"
                         + sortable_table(cases, "cv_cases", footer=table[is_mean]))
        except guarded as exc:
            log.warning("report: skipping %s (%s)", table_dir, exc)
    if cv_dir is not None:
        try:
            parts.append(candidates_part(cv_dir))
        except guarded as exc:
            log.warning("report: skipping the candidates in %s (%s)", cv_dir, exc)
    if model_dir is not None:
        try:
            parts.append(_postprocess_part(model_dir, out))
        except guarded as exc:
            log.warning("report: skipping the post-processing selection in %s (%s)", model_dir, exc)
    return "".join(parts)
