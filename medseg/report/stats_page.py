"""The lesion statistics report of a dataset, without a model (``medseg stats --report``, the
``stats_report`` pipeline stage, ``pipelines/stats_report.yaml``).

Built from the files ``medseg stats`` (or the ``stats`` stage) wrote -- ``case_stats.csv``,
``slice_stats.csv``, ``lesion_curve.csv``, ``lesion_curve_per_case.csv``, ``lesion_volumes.csv``,
``failures.csv``, ``config.yaml`` -- so it can be rebuilt alone. One page, ``report.html``
(figures embedded, and beside it as PNG):

==================  ==========================================================================
section             content
==================  ==========================================================================
Dataset             cases, modalities, splits, channels; lesions in total; with groups, one row
                    per group (cases, cases with lesion, lesions, median volume, slices with lesion)
curve(s)            the lesion-distribution curve of all cases; with groups, the groups' curves
                    overlaid in one figure, legend ``site A (n=6)`` (n: the group's cases with
                    statistics), their values in ``group_curves.csv``
Lesion sizes        the volume of every 3-D lesion (logarithmic bins), one histogram per group
Slices with lesion  slices holding lesion per case, one histogram per group
Cases               the per-case table (sortable), with the group column
Failures            the cases that could not be measured, with the reason (when any)
Provenance          the statistics' folder, the grouping and the configuration (folded)
==================  ==========================================================================

Groups (``group_by``): a manifest column such as ``site``, ``scanner`` or ``timepoint``, read by
:func:`medseg.manifest_groups.case_groups` (before any statistics, so a wrong column fails fast).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from medseg import atomic, outputs
from medseg.errors import ConfigError
from medseg.manifest import Case
from medseg.manifest_groups import EMPTY_GROUP, group_label
from medseg.report import plots as reporting
from medseg.report.files import read_csv
from medseg.report.page import (  # shared, not copied
    img_tag,
    overview,
    provenance_section,
    sortable_table,
    write_page,
)
from medseg.stats.lesions import lesion_distribution_curve

GROUP_CURVES = "group_curves.csv"  # per group: the lesion-distribution curve's rows, with group and label columns
CASE_COLUMNS = ("case_id", "modality", "split", "n_slices", "slices_with_lesion", "n_lesions_3d", "lesion_volume_ml",
                "largest_lesion_volume_ml", "largest_lesion_diameter_mm", "spacing_r", "spacing_a", "spacing_s")


@dataclass
class StatsReportInputs:
    """What the page is built from. ``stats_dir``: a ``medseg stats`` output folder; ``cases``:
    the manifest's rows (dataset line); ``groups``: case_id -> group value in the column
    ``group_by`` (:func:`medseg.manifest_groups.case_groups`), or None for no grouping."""

    stats_dir: Path
    cases: list[Case]
    title: str = "Lesion statistics"
    group_by: str | None = None
    groups: dict[str, str] | None = None
    axis: str = "axial"
    extent: str = "foreground"
    provenance: dict[str, Any] = field(default_factory=dict)


def _group_order(values: pd.Series) -> list[str]:
    """Group values sorted, the blank group last."""
    return sorted(set(values), key=lambda v: (v == EMPTY_GROUP, v))


def write_stats_report(inputs: StatsReportInputs, out_dir: str | Path) -> Path:
    """Write ``report.html`` with its PNGs (and ``group_curves.csv`` when grouped) into
    ``out_dir``; returns the page's path. Raises :class:`ConfigError` when ``stats_dir`` holds no
    statistics (``case_stats.csv``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = inputs.stats_dir
    if not (stats / outputs.CASE_STATS).is_file():
        raise ConfigError(f"{stats}: no {outputs.CASE_STATS}; the report is made from the files of medseg stats (or a stats stage)")
    cases = read_csv(stats / outputs.CASE_STATS)
    cases = cases if cases is not None and "case_id" in cases.columns else pd.DataFrame(columns=list(CASE_COLUMNS))
    grouped = inputs.group_by is not None and inputs.groups is not None
    if grouped:
        cases = cases.assign(**{inputs.group_by: cases["case_id"].map(inputs.groups).fillna(EMPTY_GROUP)})
    labels = _labels(cases, inputs) if grouped else {}

    sections = [("Dataset", _dataset_part(inputs, cases, labels))]
    if len(cases):
        sections.append(("Lesion-distribution curves" if grouped else "Lesion-distribution curve",
                         _curves_part(inputs, cases, labels, out)))
        sections.append(("Lesion sizes", _sizes_part(inputs, cases, labels, out)))
        slices = _series_by_group(cases, cases.set_index("case_id")["slices_with_lesion"], inputs, labels)
        png = reporting.plot_case_histograms(slices, out / "slices_with_lesion.png", "slices with lesion per case",
                                             "Slices with lesion per case")
        sections.append(("Slices with lesion", img_tag(png, "Slices holding lesion, per case")))
        shown = [c for c in (CASE_COLUMNS[0], *([inputs.group_by] if grouped else []), *CASE_COLUMNS[1:])
                 if c in cases.columns]
        sections.append(("Cases", "<p>One row per case with statistics; click a column header to sort.</p>"
                         + sortable_table(cases[list(dict.fromkeys(shown))], "stats_cases")))
    failures = read_csv(stats / outputs.FAILURES_FILE)
    if failures is not None and len(failures):
        sections.append(("Failures", f"<p>{len(failures)} case(s) could not be measured:</p>" + sortable_table(failures, "failures")))
    sections.append(("Provenance", provenance_section(_provenance(inputs))))
    return write_page(out / outputs.REPORT_PAGE, inputs.title, sections)


def _labels(cases: pd.DataFrame, inputs: StatsReportInputs) -> dict[str, str]:
    """group value -> legend entry, in legend order (groups without a measured case left out)."""
    counts = cases[inputs.group_by].value_counts()
    return {value: group_label(inputs.group_by, value, int(counts[value])) for value in _group_order(cases[inputs.group_by])}


def _series_by_group(cases: pd.DataFrame, values: pd.Series, inputs: StatsReportInputs,
                     labels: dict[str, str]) -> dict[str, np.ndarray]:
    """``values`` (indexed by case id; one or several per case) as one array per group legend
    entry, or one array named after the case count when there are no groups."""
    frame = pd.DataFrame({"case_id": values.index.astype(str), "value": values.to_numpy(float)})
    if not labels:
        return {f"all cases (n={len(cases)})": frame["value"].to_numpy()}
    group_of = cases.set_index("case_id")[inputs.group_by]
    frame["group"] = frame["case_id"].map(group_of)
    return {label: frame.loc[frame["group"] == value, "value"].to_numpy() for value, label in labels.items()}


def _dataset_part(inputs: StatsReportInputs, cases: pd.DataFrame, labels: dict[str, str]) -> str:
    """The manifest line of the main report, the lesions in total, and the per-group table."""
    parts = [overview(inputs.cases, None)]
    if not len(cases):
        return "".join(parts) + "<p class='headline'>No case could be measured (see Failures).</p>"
    volume = cases["lesion_volume_ml"].astype(float)
    parts.append(f"<p class='headline'>{len(cases)} case(s) with statistics along the {html.escape(inputs.axis)} axis "
                 f"(extent: {html.escape(inputs.extent)}): {int(cases['n_lesions_3d'].sum())} lesion(s) in total, "
                 f"{int((cases['n_lesions_3d'] > 0).sum())} case(s) with lesion; lesion volume per case median "
                 f"{volume.median():.2f} mL.</p>")
    if labels:
        rows = []
        for value, label in labels.items():
            group = cases[cases[inputs.group_by] == value]
            rows.append({inputs.group_by: value, "legend": label, "cases": len(group),
                         "cases with lesion": int((group["n_lesions_3d"] > 0).sum()), "lesions": int(group["n_lesions_3d"].sum()),
                         "median volume (mL)": float(group["lesion_volume_ml"].median()),
                         "median slices with lesion": float(group["slices_with_lesion"].median())})
        parts.append(f"<h3>By {html.escape(inputs.group_by)}</h3>" + sortable_table(pd.DataFrame(rows), "groups"))
    return "".join(parts)


def _curves_part(inputs: StatsReportInputs, cases: pd.DataFrame, labels: dict[str, str], out: Path) -> str:
    """The curve of all cases (the stats' own files) and, with groups, the groups' curves
    recomputed from ``slice_stats.csv`` over each group's cases (also written as ``group_curves.csv``)."""
    stats = inputs.stats_dir
    curve = read_csv(stats / outputs.LESION_CURVE)
    if curve is None or not len(curve):
        return "<p>No lesion-distribution curve in the statistics.</p>"
    figures = []
    per_case = read_csv(stats / outputs.LESION_CURVE_PER_CASE)
    png = reporting.plot_lesion_curve(curve, out / outputs.LESION_CURVE_PNG, inputs.axis, inputs.extent, per_case,
                                      title=f"Lesion distribution, all cases (n={len(cases)})")
    figures.append(img_tag(png, "All cases: lesion area per slice along the normalised axis (grey: single cases)"))
    if labels:
        slices = read_csv(stats / outputs.SLICE_STATS)
        curves = {}
        for value, label in labels.items():
            ids = set(cases.loc[cases[inputs.group_by] == value, "case_id"])
            curves[label] = lesion_distribution_curve(slices[slices["case_id"].isin(ids)], len(curve))[0]
        table = pd.concat([c.assign(**{inputs.group_by: value, "legend": label})
                           for (value, label), c in zip(labels.items(), curves.values(), strict=True)], ignore_index=True)
        atomic.write_csv(out / GROUP_CURVES, table)
        png = reporting.plot_group_curves(curves, out / "lesion_curve_groups.png", inputs.axis, inputs.extent,
                                          title=f"Lesion distribution by {inputs.group_by}")
        figures.append(img_tag(png, f"By {inputs.group_by}: mean lesion area per slice (band: inter-quartile range) and "
                                     f"share of cases with lesion; groups: {'; '.join(labels.values())}"))
    return "".join(figures)


def _sizes_part(inputs: StatsReportInputs, cases: pd.DataFrame, labels: dict[str, str], out: Path) -> str:
    """Histogram of every 3-D lesion's volume (``lesion_volumes.csv``), one per group."""
    lesions = read_csv(inputs.stats_dir / outputs.LESION_VOLUMES)
    if lesions is None or "volume_ml" not in lesions.columns:
        return (f"<p>No {outputs.LESION_VOLUMES} in {html.escape(str(inputs.stats_dir))} (statistics of an older medseg): "
                "run the statistics again for the lesion sizes.</p>")
    volumes = lesions.set_index("case_id")["volume_ml"]
    series = _series_by_group(cases, volumes, inputs, labels)
    png = reporting.plot_case_histograms(series, out / "lesion_volumes.png", "lesion volume (mL)",
                                         "Lesion sizes (every 3-D lesion)", log_bins=True)
    return img_tag(png, f"Volume of each 3-D lesion ({len(lesions)} lesions), logarithmic bins")


def _provenance(inputs: StatsReportInputs) -> dict[str, Any]:
    """The caller's record, plus the statistics' folder, the grouping and their configuration."""
    record: dict[str, Any] = {"statistics": str(inputs.stats_dir), "group_by": inputs.group_by, **inputs.provenance}
    config = inputs.stats_dir / outputs.RUN_CONFIG
    if "config" not in record and config.is_file():
        record["config"] = yaml.safe_load(config.read_text(encoding="utf-8"))
    return record
