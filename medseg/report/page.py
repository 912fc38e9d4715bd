"""The pieces of a medseg report page, shared by every report (:mod:`medseg.report.html`,
:mod:`medseg.report.stats_page`): numbers and figures as HTML, sortable tables, the dataset overview,
the provenance section, and the page itself (style and table-sorting script)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medseg import atomic
from medseg.manifest import Case


def num(value: Any, fmt: str = "{:.4f}") -> str:
    """A number for the page; ``n/a`` for missing/NaN (JSON null)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return fmt.format(value) if isinstance(value, (int, float)) else html.escape(str(value))


def img_tag(png: Path, alt: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def sortable_table(frame: pd.DataFrame, table_id: str, float_format: str = "{:.4g}", footer: pd.DataFrame | None = None) -> str:
    """A sortable table (``DataFrame.to_html``; the page script makes its headers sort it).
    ``footer`` rows (same columns, e.g. a mean) go into ``<tfoot>`` and stay last when sorting."""
    def render(part: pd.DataFrame, **kwargs: Any) -> str:
        return part.to_html(index=False, border=0, na_rep="", escape=True, float_format=float_format.format, **kwargs)

    table = render(frame, table_id=table_id, classes="sortable")
    if footer is not None and len(footer):
        rows = render(footer[frame.columns]).split("<tbody>", 1)[1].split("</tbody>", 1)[0]
        table = table.replace("</table>", f"<tfoot>{rows}</tfoot></table>")
    return f'<div class="scroll">{table}</div>'


def overview(cases: list[Case], ref_cases: pd.DataFrame | None) -> str:
    """The cases' modalities, splits and channels; with ``ref_cases`` (the reference statistics' per-case
    table), the lesion totals and the per-case table."""
    n = len(cases)
    modalities = pd.Series([c.modality for c in cases]).value_counts().to_dict()
    splits = pd.Series([c.split or "unassigned" for c in cases]).value_counts().to_dict()
    channels = cases[0].channels if cases else []
    parts = [f"<p>{n} case(s); modalities {modalities}; splits {splits}; channels {channels}.</p>"]
    if ref_cases is not None and len(ref_cases):
        cols = [c for c in ("case_id", "modality", "split", "spacing_r", "spacing_a", "spacing_s", "n_slices", "n_lesions_3d",
                            "lesion_volume_ml", "largest_lesion_diameter_mm", "slices_with_lesion") if c in ref_cases.columns]
        summary = ref_cases[["n_lesions_3d", "lesion_volume_ml"]].describe().loc[["mean", "50%", "min", "max"]]
        parts.append(
            f"<p>Reference lesions: {int(ref_cases['n_lesions_3d'].sum())} in total; volume per case "
            f"mean {summary.loc['mean', 'lesion_volume_ml']:.2f} mL, median {summary.loc['50%', 'lesion_volume_ml']:.2f} mL.</p>"
        )
        parts.append(sortable_table(ref_cases[cols], "overview"))
    return "".join(parts)


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
        interval = f" (95 % CI {num(ci[0], '{:.3f}')}–{num(ci[1], '{:.3f}')})" if isinstance(ci, list) and len(ci) == 2 else ""
        parts.append(f"CV Dice {cv['dice_mean']:.3f}{interval}")
    return " · ".join(parts)


def provenance_section(provenance: dict[str, Any]) -> str:
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
