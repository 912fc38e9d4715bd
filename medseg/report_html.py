"""The HTML report: one self-contained page (PNG figures embedded) plus the PNG files.

Sections: dataset overview, lesion-distribution curves (reference vs predicted), metrics per
case (sortable) and summary, lesion sizes, precision-recall curve with AP, detection recall by
size, slice overlays of the best / median / worst cases, provenance. Every section is built
from files the earlier stages wrote (CSV/JSON/NIfTI), so the report can be rebuilt alone.
Only manifest case ids appear; nothing is read from DICOM headers.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medseg import atomic, reporting
from medseg.lesions import AXIS_INDEX
from medseg.manifest import Case


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


def _read_csv(path: Path) -> pd.DataFrame | None:
    if path.is_file():
        try:
            return pd.read_csv(path, dtype={"case_id": str}, keep_default_na=True)
        except pd.errors.EmptyDataError:
            return None
    return None


def _num(value: Any, fmt: str = "{:.4f}") -> str:
    """A number for the page; ``n/a`` for missing/NaN (JSON null)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return fmt.format(value) if isinstance(value, (int, float)) else html.escape(str(value))


def _img_tag(png: Path, alt: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(frame: pd.DataFrame, table_id: str, float_format: str = "{:.4g}") -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, (float, np.floating)):
            return "" if np.isnan(value) else float_format.format(value)
        return html.escape(str(value))

    head = "".join(f'<th onclick="sortTable(\'{table_id}\', {i})">{html.escape(str(c))}</th>' for i, c in enumerate(frame.columns))
    rows = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>" for row in frame.itertuples(index=False))
    return (f'<div class="scroll"><table id="{table_id}" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{rows}</tbody></table></div>')


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

    slices = _read_csv(inputs.ref_stats_dir / "slice_stats.csv") if inputs.ref_stats_dir else None
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
    from medseg.io import read_volume, to_ras

    image = read_volume(case.images[case.channels[0]], check_finite=False)
    img_ras, affine = to_ras(image.array, image.affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    ref = pred = None
    if case.label is not None:
        ref = to_ras(read_volume(case.label).array > 0, image.affine)[0]
    mask_path = pred_dir / f"{case.case_id}_mask.nii.gz" if pred_dir else None
    if mask_path is not None and mask_path.is_file():
        pred = to_ras(read_volume(mask_path).array > 0, image.affine)[0]
    ax = AXIS_INDEX[axis]
    source = ref if ref is not None and ref.any() else pred
    others = tuple(a for a in range(3) if a != ax)
    index = int(np.argmax(source.sum(axis=others))) if source is not None and source.any() else img_ras.shape[ax] // 2
    take = lambda a: None if a is None else np.take(a, index, axis=ax)  # noqa: E731
    in_plane = tuple(float(spacing[a]) for a in others)
    return reporting.plot_overlay(take(img_ras), take(ref), take(pred), in_plane, out, f"{title} (slice {index})")  # type: ignore[arg-type]


def write_report(inputs: ReportInputs, out_dir: str | Path) -> Path:
    """Write ``report.html`` and its PNGs into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: list[tuple[str, str]] = []
    ref_cases = _read_csv(inputs.ref_stats_dir / "case_stats.csv") if inputs.ref_stats_dir else None
    sections.append(("Dataset", _overview(inputs, ref_cases)))

    # lesion-distribution curves
    curves = []
    ref_curve = _read_csv(inputs.ref_stats_dir / "lesion_curve.csv") if inputs.ref_stats_dir else None
    pred_curve = _read_csv(inputs.pred_stats_dir / "lesion_curve.csv") if inputs.pred_stats_dir else None
    if ref_curve is not None and len(ref_curve):
        per_case = _read_csv(inputs.ref_stats_dir / "lesion_curve_per_case.csv")  # type: ignore[operator]
        png = reporting.plot_lesion_curve(ref_curve, out / "lesion_curve_reference.png", inputs.axis, inputs.extent, per_case,
                                          title="Reference lesion distribution")
        curves.append(_img_tag(png, "Reference lesions: area per slice along the normalised axis"))
    if pred_curve is not None and len(pred_curve):
        per_case = _read_csv(inputs.pred_stats_dir / "lesion_curve_per_case.csv")  # type: ignore[operator]
        same_cases = _reference_curve_of(inputs, set(per_case["case_id"]) if per_case is not None else set(), len(pred_curve))
        png = reporting.plot_lesion_curve(pred_curve, out / "lesion_curve_predicted.png", inputs.axis, inputs.extent, per_case,
                                          title="Predicted vs reference lesion distribution (same cases)",
                                          reference=same_cases, label="predicted lesion area")
        curves.append(_img_tag(png, "Predicted lesions (red) against the reference mean (dashed)"))
    if curves:
        sections.append(("Lesion-distribution curves", "".join(curves)))

    # evaluation
    metrics = _read_csv(inputs.eval_dir / "metrics_per_case.csv") if inputs.eval_dir else None
    summary_path = inputs.eval_dir / "summary.json" if inputs.eval_dir else None
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
        sections.append(("Metrics", f"<ul>{''.join(lines)}</ul>" + _table(metrics[cols], "metrics")))
        figures = []
        pr = _read_csv(inputs.eval_dir / "pr_curve.csv")  # type: ignore[operator]
        cfg = summary.get("config", {}).get("evaluation", {})
        thr = float(cfg.get("iou_threshold", 0.5))
        if pr is not None:
            ap = {region: info.get("detection", {}).get("ap", {}).get(str(thr), float("nan"))
                  for region, info in summary.get("per_region", {}).items()}
            ap = {k: (v if isinstance(v, (int, float)) else float("nan")) for k, v in ap.items()}
            figures.append(_img_tag(reporting.plot_pr_curves(pr, ap, out / "pr_curve.png", thr), "Precision-recall of lesion detection"))
        matches = _read_csv(inputs.eval_dir / "lesion_matches.csv")  # type: ignore[operator]
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
        predicted = [c for c in inputs.cases if (inputs.pred_dir / f"{c.case_id}_mask.nii.gz").is_file()]
        for case in predicted[:3]:
            png = _overlay_png(case, inputs.pred_dir, inputs.axis, out / f"overlay_{case.case_id}.png", case.case_id)
            if png is not None:
                overlays.append(_img_tag(png, f"{case.case_id}: prediction red"))
        if overlays:
            sections.append(("Slice overlays", "".join(overlays)))

    prov = "".join(f"<tr><th>{html.escape(str(k))}</th><td><pre>{html.escape(v if isinstance(v, str) else json.dumps(v, indent=1, default=str))}</pre></td></tr>"
                   for k, v in inputs.provenance.items())
    sections.append(("Provenance", f"<table class='prov'>{prov}</table>"))
    body = "".join(f"<section><h2>{html.escape(title)}</h2>{content}</section>" for title, content in sections)
    page = _PAGE.replace("{{title}}", html.escape(inputs.title)).replace("{{body}}", body)
    return atomic.write_text(out / "report.html", page)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}th,td{border:1px solid #ddd;padding:3px 6px;text-align:right}
th{background:#f3f3f3;cursor:pointer}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5em;vertical-align:top}figure img{max-width:560px;border:1px solid #eee}
figcaption{font-size:.8em;color:#555;max-width:560px}pre{margin:0;text-align:left;white-space:pre-wrap;font-size:.8em}
table.prov{width:100%}table.prov td{text-align:left}.scroll{overflow-x:auto;max-width:100%}
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
</script></head>
<body><h1>{{title}}</h1>{{body}}</body></html>
"""
