"""Accuracy of two or more runs on the same patients: paired differences with patient-bootstrap intervals.

``medseg compare RUN_A RUN_B [...]`` reads one per-case table from each run folder and compares the
cases every run scored. Where a run's table is found, first match wins:

=========================================  ===========================================================
``<run>/cv/cv_table.csv``                  a pipeline run's cross-validation (out-of-fold, one row per
                                           pool case with ``patient_id`` and ``fold``; the ``mean`` row
                                           is dropped)
``<run>/cv_table.csv``                     a ``medseg cv --out`` folder (or the ``cv/`` folder itself)
``<run>/evaluate/metrics_per_case.csv``    a pipeline run's evaluation (one row per case and region)
``<run>/metrics_per_case.csv``             a ``medseg evaluate --out`` folder
=========================================  ===========================================================

No manifest is read: the patient of a case is the ``patient_id`` of the first run whose table has
one (a CV table), else the case is its own patient. Of an evaluation table with several regions
the first region is compared, as the CV table does (the region the models segment).

Statistics (the first run is the baseline; every other run is compared with it):

- the mean of each metric of each run over the common cases, with its 95 % interval from
  :func:`medseg.metrics.uncertainty.bootstrap_mean_ci` (resampling patients);
- the paired difference ``run - baseline`` per case, its mean and 95 % patient-bootstrap interval;
- per patient (the mean of the patient's case differences): wins (the run is better: higher Dice /
  lesion scores, lower distances), losses and ties (a difference within :data:`medseg.metrics.uncertainty.TIE_TOLERANCE` of 0);
- when both runs are CV runs whose common cases sit in the same folds: each fold's two means.

Missing values: a case whose metric is empty, NaN or infinite in either run (HD95 of an empty mask)
is left out of that metric's difference and means, not counted as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medseg.errors import InputFileError, MedsegError, printable_path
from medseg.metrics.uncertainty import MIN_PATIENTS, bootstrap_mean_ci, paired_difference
from medseg.outputs import CV_TABLE, EVAL_PER_CASE

#: pipeline stage folders holding the tables (``medseg.pipeline.stages``)
CV_STAGE = "cv"
EVALUATE_STAGE = "evaluate"
#: where a run's table is looked for, in this order: (relative path, kind)
TABLE_PLACES: tuple[tuple[Path, str], ...] = (
    (Path(CV_STAGE) / CV_TABLE, "cv"),
    (Path(CV_TABLE), "cv"),
    (Path(EVALUATE_STAGE) / EVAL_PER_CASE, "evaluation"),
    (Path(EVAL_PER_CASE), "evaluation"),
)
#: metrics that can be compared: name -> +1 when higher is better, -1 when lower is better
METRIC_DIRECTION: dict[str, int] = {
    "dice": 1, "hd95_mm": -1, "assd_mm": -1, "lesion_precision": 1, "lesion_recall": 1, "lesion_f1": 1,
    "lesion_dice": 1,
}  # fmt: skip
#: compared when no metric is named (those every run's table has)
DEFAULT_METRICS = ("dice", "hd95_mm", "lesion_f1")
#: fewer common cases than this are refused (the bootstrap needs this many patients)
MIN_CASES = MIN_PATIENTS


class ComparisonError(MedsegError):
    """The runs cannot be compared (no or too few common cases, a metric a run lacks)."""


@dataclass
class RunTable:
    """One run's per-case scores.

    ``cases``: one row per case, indexed by ``case_id`` (str), with ``patient_id`` (str; the case id
    when the table has none), ``fold`` (int, CV tables only) and the metric columns (float).
    """

    label: str
    folder: Path
    table_path: Path
    kind: str  # "cv" or "evaluation"
    cases: pd.DataFrame
    has_patients: bool  # the table named the patients (else every case is its own patient)
    region: str | None = None  # the region compared when the table had a region column


@dataclass
class Comparison:
    """What :func:`compare_runs` found. Frames (one row each):

    - ``runs``: label, folder, kind, table, cases, left_out (cases not in every run), region
    - ``means``: run, metric, n_cases, mean, ci_low, ci_high
    - ``differences``: run, metric, n_cases, n_patients, mean_difference, ci_low, ci_high, wins,
      losses, ties (per patient; a win is the run better than the baseline)
    - ``per_patient``: run, metric, patient_id, n_cases, baseline, value, difference
    - ``per_fold``: run, metric, fold, n_cases, baseline, value, difference (CV runs with the same folds)
    """

    baseline: str
    metrics: list[str]
    case_ids: list[str]
    n_patients: int
    runs: pd.DataFrame
    means: pd.DataFrame
    differences: pd.DataFrame
    per_patient: pd.DataFrame
    per_fold: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def find_table(folder: str | Path) -> tuple[Path, str]:
    """``(table path, kind)`` of the run in ``folder`` (module docstring, first match wins).

    Raises ``InputFileError`` naming the folder and the files looked for when there is none.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputFileError(root, "run folder not found" if not root.exists() else "not a folder; give a run folder")
    for relative, kind in TABLE_PLACES:
        if (root / relative).is_file():
            return root / relative, kind
    looked = ", ".join(str(relative) for relative, _ in TABLE_PLACES)
    raise InputFileError(root, f"no per-case table in this folder (looked for {looked}); give a pipeline run, "
                               "medseg cv or medseg evaluate output folder")  # fmt: skip


def read_run(folder: str | Path, label: str | None = None) -> RunTable:
    """The per-case table of the run in ``folder`` (:func:`find_table`), cleaned: the CV ``mean``
    row dropped, the first region kept, patients filled in, metric columns as float with
    non-finite values as NaN. Raises ``InputFileError`` naming the table and the problem."""
    path, kind = find_table(folder)
    try:
        frame = pd.read_csv(path, dtype={"case_id": str, "patient_id": str}, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise InputFileError(path, f"cannot be read as a CSV table: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    if "case_id" not in frame.columns:
        raise InputFileError(path, f"has no case_id column; not a {CV_TABLE} or {EVAL_PER_CASE}")
    frame = frame[frame["case_id"].notna()].copy()
    if kind == "cv":
        frame = frame[frame["case_id"] != "mean"]  # the table's last row: means over cases
        if "fold" not in frame.columns:
            raise InputFileError(path, f"has no fold column; not a {CV_TABLE}")
    region = None
    if "region" in frame.columns and len(frame):
        region = str(frame["region"].iloc[0])
        frame = frame[frame["region"].astype(str) == region]
    duplicated = frame["case_id"][frame["case_id"].duplicated()].unique().tolist()
    if duplicated:
        raise InputFileError(path, f"case {duplicated[0]!r} has {int((frame['case_id'] == duplicated[0]).sum())} rows; "
                                   "expected one row per case (and region)")  # fmt: skip
    has_patients = "patient_id" in frame.columns and bool(frame["patient_id"].notna().all()) and len(frame) > 0
    frame["patient_id"] = frame["patient_id"] if has_patients else frame["case_id"]
    keep = ["patient_id"]
    if kind == "cv":
        fold = pd.to_numeric(frame["fold"], errors="coerce")
        if fold.isna().any():
            raise InputFileError(path, "fold column has a value that is not a number")
        frame["fold"] = fold.astype(int)
        keep.append("fold")
    for metric in METRIC_DIRECTION:
        if metric not in frame.columns:
            continue
        values = pd.to_numeric(frame[metric], errors="coerce")
        bad = frame[metric].notna() & values.isna()
        if bad.any():
            raise InputFileError(path, f"column {metric} holds {frame.loc[bad, metric].iloc[0]!r} (case "
                                       f"{frame.loc[bad, 'case_id'].iloc[0]}), not a number")  # fmt: skip
        frame[metric] = values.astype(float).replace([np.inf, -np.inf], np.nan)
        keep.append(metric)
    cases = frame.set_index("case_id")[keep]
    return RunTable(label=label or printable_path(folder), folder=Path(folder), table_path=path, kind=kind, cases=cases,
                    has_patients=has_patients, region=region)  # fmt: skip


def common_cases(runs: list[RunTable]) -> list[str]:
    """Case ids every run scored, sorted. Raises ``ComparisonError`` when fewer than
    :data:`MIN_CASES` (or none) are shared."""
    shared = set(runs[0].cases.index)
    for run in runs[1:]:
        shared &= set(run.cases.index)
    if not shared:
        raise ComparisonError("the runs share no case: " + "; ".join(
            f"{run.label} has {len(run.cases)} case(s)" for run in runs) + " (compare runs on the same patients)")
    if len(shared) < MIN_CASES:
        raise ComparisonError(f"the runs share only {len(shared)} case(s) ({', '.join(sorted(shared))}); at least "
                              f"{MIN_CASES} are needed for a patient-bootstrap interval")  # fmt: skip
    return sorted(shared)


def choose_metrics(runs: list[RunTable], requested: list[str] | None = None) -> list[str]:
    """The metrics to compare: ``requested`` (each must be known and in every run's table), else
    those of :data:`DEFAULT_METRICS` every table has."""
    if requested:
        for metric in requested:
            if metric not in METRIC_DIRECTION:
                raise ComparisonError(f"unknown metric {metric!r}; choose from {', '.join(METRIC_DIRECTION)}")
            for run in runs:
                if metric not in run.cases.columns:
                    raise ComparisonError(f"{printable_path(run.table_path)}: has no {metric} column")
        return list(dict.fromkeys(requested))
    metrics = [m for m in DEFAULT_METRICS if all(m in run.cases.columns for run in runs)]
    if not metrics:
        raise ComparisonError(f"the runs' tables share none of {', '.join(DEFAULT_METRICS)}")
    return metrics


def _ci(values: np.ndarray, patients: np.ndarray) -> tuple[float, float]:
    ci = bootstrap_mean_ci(values, list(patients))
    return (np.nan, np.nan) if ci is None else ci


def compare_runs(runs: list[RunTable], metrics: list[str] | None = None) -> Comparison:
    """Compare ``runs[1:]`` with ``runs[0]`` on their common cases (module docstring).

    Deterministic: the bootstrap uses seed 0. Raises ``ComparisonError`` for fewer than two runs,
    too few common cases or a metric a run lacks.
    """
    if len(runs) < 2:
        raise ComparisonError("give at least two runs to compare")
    case_ids = common_cases(runs)
    chosen = choose_metrics(runs, metrics)
    named = next((run for run in runs if run.has_patients), runs[0])
    patients = named.cases.loc[case_ids, "patient_id"].to_numpy(dtype=str)
    notes = []
    if not any(run.has_patients for run in runs):
        notes.append("no table names patients: every case is its own patient")
    elif not all(run.has_patients for run in runs):
        notes.append(f"patients as in {named.label}")
    run_rows = []
    for run in runs:
        run_rows.append({"label": run.label, "folder": printable_path(run.folder), "kind": run.kind,
                         "table": printable_path(run.table_path), "cases": len(run.cases),
                         "left_out": len(run.cases) - len(case_ids), "region": run.region or ""})  # fmt: skip
    mean_rows, diff_rows, patient_rows, fold_rows = [], [], [], []
    for run in runs:
        for metric in chosen:
            values = run.cases.loc[case_ids, metric].to_numpy(dtype=float)
            ok = ~np.isnan(values)
            low, high = _ci(values[ok], patients[ok])
            mean_rows.append({"run": run.label, "metric": metric, "n_cases": int(ok.sum()),
                              "mean": float(values[ok].mean()) if ok.any() else np.nan, "ci_low": low, "ci_high": high})  # fmt: skip
    base = runs[0]
    for run in runs[1:]:
        for metric in chosen:
            d = paired_difference(run.cases.loc[case_ids, metric].to_numpy(dtype=float),
                                  base.cases.loc[case_ids, metric].to_numpy(dtype=float), patients, METRIC_DIRECTION[metric])
            low, high = d.ci95 or (np.nan, np.nan)
            diff_rows.append({"run": run.label, "metric": metric, "n_cases": int(d.n_cases.sum()),
                              "n_patients": len(d.patients), "mean_difference": d.mean, "ci_low": low, "ci_high": high,
                              "wins": d.wins, "losses": d.losses, "ties": d.ties})  # fmt: skip
            for k, patient_id in enumerate(d.patients):
                patient_rows.append({"run": run.label, "metric": metric, "patient_id": str(patient_id),
                                     "n_cases": int(d.n_cases[k]), "baseline": d.baseline[k], "value": d.value[k],
                                     "difference": d.difference[k]})  # fmt: skip
        fold_rows += _per_fold(base, run, case_ids, chosen, notes)
    return Comparison(
        baseline=base.label, metrics=chosen, case_ids=case_ids, n_patients=len(set(patients)),
        runs=pd.DataFrame(run_rows), means=pd.DataFrame(mean_rows), differences=pd.DataFrame(diff_rows),
        per_patient=pd.DataFrame(patient_rows, columns=["run", "metric", "patient_id", "n_cases", "baseline", "value",
                                                        "difference"]),
        per_fold=pd.DataFrame(fold_rows, columns=["run", "metric", "fold", "n_cases", "baseline", "value", "difference"]),
        notes=notes,
    )  # fmt: skip


def _per_fold(base: RunTable, run: RunTable, case_ids: list[str], metrics: list[str], notes: list[str]) -> list[dict]:
    """Per-fold means of ``base`` and ``run`` when both are CV runs whose common cases sit in the
    same folds (else a note and no rows)."""
    if base.kind != "cv" or run.kind != "cv":
        return []
    fold_a = base.cases.loc[case_ids, "fold"]
    fold_b = run.cases.loc[case_ids, "fold"]
    if not (fold_a == fold_b).all():
        notes.append(f"{run.label}: folds differ from the baseline's, no per-fold means")
        return []
    rows = []
    for metric in metrics:
        for fold in sorted(set(fold_a)):
            ids = fold_a.index[fold_a == fold]
            a = base.cases.loc[ids, metric].to_numpy(dtype=float)
            b = run.cases.loc[ids, metric].to_numpy(dtype=float)
            ok = ~(np.isnan(a) | np.isnan(b))
            mean_a = float(a[ok].mean()) if ok.any() else np.nan
            mean_b = float(b[ok].mean()) if ok.any() else np.nan
            rows.append({"run": run.label, "metric": metric, "fold": int(fold), "n_cases": int(ok.sum()),
                         "baseline": mean_a, "value": mean_b, "difference": mean_b - mean_a})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# presentation: tables as text (markdown / HTML) and the figure


def _num(value: float, digits: int = 4, signed: bool = False) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _digits(metric: str) -> int:
    return 2 if metric.endswith("_mm") else 4


def _with_ci(mean: float, low: float, high: float, metric: str, signed: bool = False) -> str:
    d = _digits(metric)
    interval = "n/a" if not np.isfinite(low) else f"{_num(low, d, signed)} to {_num(high, d, signed)}"
    return f"{_num(mean, d, signed)} ({interval})"


def display_tables(comparison: Comparison) -> dict[str, pd.DataFrame]:
    """The comparison as text tables (title -> frame of strings), in the order they are shown."""
    c = comparison
    runs = pd.DataFrame({
        "run": c.runs["label"], "kind": c.runs["kind"], "table": c.runs["table"],
        "cases": c.runs["cases"].astype(str), "left out (not in every run)": c.runs["left_out"].astype(str),
    })  # fmt: skip
    if c.runs["region"].astype(bool).any():
        runs["region"] = c.runs["region"]
    means = pd.DataFrame({"run": [row["label"] for _, row in c.runs.iterrows()]})
    for metric in c.metrics:
        rows = c.means[c.means["metric"] == metric].set_index("run")
        means[f"{metric} mean (95 % CI)"] = [_with_ci(rows.loc[r, "mean"], rows.loc[r, "ci_low"], rows.loc[r, "ci_high"], metric)
                                             for r in means["run"]]  # fmt: skip
    diffs = pd.DataFrame({
        "run - baseline": c.differences["run"], "metric": c.differences["metric"],
        "mean difference (95 % CI)": [_with_ci(r.mean_difference, r.ci_low, r.ci_high, r.metric, signed=True)
                                      for r in c.differences.itertuples()],
        "better / worse / tied patients": [f"{r.wins} / {r.losses} / {r.ties}" for r in c.differences.itertuples()],
        "cases": c.differences["n_cases"].astype(str),
    })  # fmt: skip
    tables = {"Runs": runs, "Means": means, f"Paired differences against {c.baseline}": diffs}
    if len(c.per_fold):
        tables["Per fold (baseline -> run)"] = pd.DataFrame({
            "run": c.per_fold["run"], "metric": c.per_fold["metric"], "fold": c.per_fold["fold"].astype(str),
            "cases": c.per_fold["n_cases"].astype(str),
            "baseline -> run": [f"{_num(r.baseline, _digits(r.metric))} -> {_num(r.value, _digits(r.metric))}"
                                for r in c.per_fold.itertuples()],
            "difference": [_num(r.difference, _digits(r.metric), signed=True) for r in c.per_fold.itertuples()],
        })  # fmt: skip
    return tables


def headline(comparison: Comparison) -> str:
    """One sentence: how many cases and patients are compared against which baseline."""
    c = comparison
    return (f"{len(c.case_ids)} case(s) of {c.n_patients} patient(s) scored by every run; baseline {c.baseline}; "
            "intervals: 95 % patient bootstrap; better / worse per patient (higher Dice and lesion scores, "
            "lower distances)")  # fmt: skip


def markdown_table(frame: pd.DataFrame) -> str:
    """``frame`` as a markdown table (cells as text, ``|`` escaped)."""
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def to_markdown(comparison: Comparison) -> str:
    """The comparison as markdown: a headline, the notes, then each table of :func:`display_tables`."""
    parts = ["# Run comparison", "", headline(comparison), ""]
    parts += [f"- {note}" for note in comparison.notes] + ([""] if comparison.notes else [])
    for title, frame in display_tables(comparison).items():
        parts += [f"## {title}", "", markdown_table(frame), ""]
    return "\n".join(parts)


def differences_png(comparison: Comparison) -> bytes:
    """PNG of the per-patient paired differences: one panel per metric, one row per compared run,
    a dot per patient, the mean difference with its 95 % interval as a bar, 0 as a dashed line."""
    from io import BytesIO

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = comparison
    others = c.differences["run"].drop_duplicates().tolist()
    fig = Figure(figsize=(1.5 + 3.8 * len(c.metrics), 1.6 + 0.6 * len(others)), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(c.metrics), squeeze=False)[0]
    jitter = np.random.default_rng(0)
    for ax, metric in zip(axes, c.metrics, strict=True):
        for y, run in enumerate(others):
            points = c.per_patient[(c.per_patient["run"] == run) & (c.per_patient["metric"] == metric)]["difference"]
            ax.scatter(points, y + jitter.uniform(-0.15, 0.15, len(points)), s=14, alpha=0.6, color="tab:blue")
            row = c.differences[(c.differences["run"] == run) & (c.differences["metric"] == metric)].iloc[0]
            if np.isfinite(row["ci_low"]):
                ax.plot([row["ci_low"], row["ci_high"]], [y, y], color="black", linewidth=2.5)
            ax.plot([row["mean_difference"]], [y], marker="D", color="black")
        ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(others)), [run[-28:] for run in others] if ax is axes[0] else [])
        ax.set_ylim(-0.6, len(others) - 0.4)
        better = "higher" if METRIC_DIRECTION[metric] > 0 else "lower"
        ax.set_xlabel(f"{metric}: run - baseline\n({better} is better)")
    fig.suptitle(f"per-patient paired differences against {c.baseline[-40:]}", fontsize=10)
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def to_html(comparison: Comparison) -> str:
    """A self-contained page: headline, notes, the tables and :func:`differences_png` inline (base64)."""
    import base64
    import html

    figure = base64.b64encode(differences_png(comparison)).decode("ascii")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>Run comparison</title>',
             "<style>body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}"
             "img{max-width:100%}</style></head><body>", "<h1>Run comparison</h1>",
             f"<p>{html.escape(headline(comparison))}</p>"]  # fmt: skip
    if comparison.notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in comparison.notes) + "</ul>")
    for title, frame in display_tables(comparison).items():
        parts += [f"<h2>{html.escape(title)}</h2>", frame.to_html(index=False, border=0, escape=True)]
    alt = "per-patient paired differences (dots), mean and 95 % interval (black)"
    parts += ["<h2>Per-patient differences</h2>",
              f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{figure}">'
              f"<figcaption>{html.escape(alt)}</figcaption></figure>", "</body></html>"]  # fmt: skip
    return "\n".join(parts) + "\n"


def differences_table(comparison: Comparison) -> pd.DataFrame:
    """``paired_differences.csv``: one row per (run, metric, patient) with the baseline's value,
    the run's value and their difference (means over the patient's common cases)."""
    return comparison.per_patient.assign(baseline_run=comparison.baseline)[
        ["baseline_run", "run", "metric", "patient_id", "n_cases", "baseline", "value", "difference"]]


def run_labels(folders: list[str]) -> list[str]:
    """How each run is named in the tables: the folder as given (trailing separators dropped),
    ``#2``, ``#3``... appended when the same folder is given twice."""
    labels: list[str] = []
    for folder in folders:
        label = printable_path(folder.rstrip("/\\") or folder)
        labels.append(label if label not in labels else f"{label} #{len(labels) + 1}")
    return labels
