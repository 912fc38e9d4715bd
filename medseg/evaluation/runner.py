"""Evaluate a folder of predicted masks against the manifest's reference labels (files -> tables).

The runner of three parts: :mod:`medseg.evaluation.files` reads each case's files (the prediction
folder's files are named in :mod:`medseg.outputs`, the contract: per case a mask (required), a
probability map and a lesion instance map with its table (optional));
:mod:`medseg.metrics.case_scores` scores each case region by region (regions: ``data.labels`` or
``evaluation.regions``; detection scores of predicted lesions: :mod:`medseg.metrics.lesion_scores`);
:mod:`medseg.metrics.summary` pools the cases. This module runs the case loop, records failures
and writes the tables.

Outputs (in ``out_dir``)
------------------------
- ``metrics_per_case.csv``: one row per (case, region): voxel metrics and the ``empty`` flag
  (:mod:`medseg.metrics.voxel`), lesion counts / P / R / F1 / lesion-wise Dice and recall by
  size bucket (:mod:`medseg.metrics.lesion`), per-case AP per IoU threshold, slice-level
  detection counts, sensitivity and specificity, score source.
- ``lesion_matches.csv``: one row per reference and per predicted lesion: case, region, side,
  lesion id, size (voxels, mm³), size bucket, centroid (voxel indices I, J, K), matched partner
  ids, IoU and Dice with the partners, best single-lesion IoU, score.
- ``pr_curve.csv``: per region and IoU threshold, the dataset-wide ranking: class,
  iou_threshold, rank, score, precision, recall (plus case_id, lesion_id, tp).
- ``summary.json``: the configuration used, case counts, per-region mean / median / std of each
  metric (NaN skipped and counted), global Dice, empty-mask counts, pooled lesion metrics,
  recall by size, AP per threshold, mAP per threshold and over thresholds, slice detection;
  the score source of the cases with predicted lesions, ``mixed`` when they differ (each
  case's is in ``metrics_per_case.csv``).
- ``failures.csv``: one row (case_id, error) per case that could not be evaluated (missing or
  unreadable prediction or reference, grid mismatch, non-integer predicted mask...); header only
  when none failed. The tables and the summary cover the other cases; ``summary.json`` counts
  the failed ones (``n_failed``, ``failures``). ``medseg evaluate`` without a split scores the
  cases that have a predicted mask: a labelled case without one is not a failure but listed in
  ``summary.json`` (``n_not_predicted``, ``not_predicted``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from medseg import __version__, atomic
from medseg.config import Config
from medseg.errors import InputFileError, ManifestError, MedsegError
from medseg.evaluation.files import (
    PredictionFiles,
    has_prediction,
    prediction_files,
    read_case,
    read_score_source,
)
from medseg.manifest import Case, read_manifest
from medseg.metrics.case_scores import (
    LESION_TABLE_COLUMNS,
    Region,
    RegionResult,
    case_box,
    evaluate_region,
    prediction_masks,
    reference_masks,
    regions_from_config,
    score_case,
)
from medseg.metrics.lesion_scores import ScoreSource
from medseg.metrics.summary import (
    LESION_COLUMNS,
    PR_CURVE_COLUMNS,
    VOXEL_COLUMNS,
    describe,
    json_safe,
    summarise_dataset,
    summarise_region,
)
from medseg.outputs import EVAL_LESION_MATCHES, EVAL_PER_CASE, EVAL_PR_CURVE, EVAL_SUMMARY, FAILURES_FILE
from medseg.progress import progress_enabled

# the parts' public names, importable from here as before the split
__all__ = [
    "LESION_COLUMNS", "LESION_TABLE_COLUMNS", "PR_CURVE_COLUMNS", "VOXEL_COLUMNS", "EvaluationError",
    "PredictionFiles", "Region", "RegionResult", "ScoreSource", "case_box", "describe", "evaluate",
    "evaluate_case", "evaluate_region", "prediction_files", "prediction_masks", "read_score_source",
    "reference_masks", "regions_from_config", "select_cases", "summarise_region", "write_tables",
]  # fmt: skip

log = logging.getLogger(__name__)


class EvaluationError(MedsegError):
    """No case of the manifest could be evaluated (each one's error is in ``failures.csv``)."""


def evaluate_case(case: Case, pred_dir: Path, cfg: Config, regions: Sequence[Region]) -> list[RegionResult]:
    """Read one case's reference and prediction files; return one result per region."""
    return score_case(read_case(case, pred_dir), cfg, regions)


def select_cases(cases: Sequence[Case], split: str | None, manifest_path: Path) -> list[Case]:
    """Manifest rows that have a label (and belong to ``split`` when given)."""
    chosen = [c for c in cases if c.label is not None and (split is None or c.split == split)]
    if not chosen:
        where = f" in split {split!r}" if split else ""
        raise ManifestError(manifest_path, [f"no case with a label{where}: nothing to evaluate"])
    return chosen


def evaluate(
    pred_dir: str | Path,
    manifest_path: str | Path,
    out_dir: str | Path,
    cfg: Config | None = None,
    progress: bool = True,
    cases: list[Case] | None = None,
    skip_unpredicted: bool = False,
) -> dict[str, Any]:
    """Evaluate ``pred_dir`` against the labels of ``manifest_path``; write the four tables to
    ``out_dir`` (see the module docstring) and return the summary dict (also ``summary.json``).
    ``cases``: evaluate these rows of the manifest instead of all of them (e.g. only those
    that have a prediction); the label and split rules apply to them the same way.
    ``skip_unpredicted``: a labelled case without a predicted mask in ``pred_dir`` is left out
    rather than failed (``medseg evaluate`` without a split: a folder of predictions for some
    of the manifest's cases); the summary lists them (``n_not_predicted``, ``not_predicted``).

    A case that cannot be evaluated (prediction or reference missing or unreadable, a grid
    mismatch, a predicted mask with non-integer values...) is recorded in ``failures.csv``
    (case_id, error; header only when none failed) and the others go on; the summary covers the
    evaluated cases and lists the failures (``n_failed``, ``failures``). Raises
    ``InputFileError`` when ``pred_dir`` is not a folder, ``ManifestError`` when the manifest is
    invalid or no case has a label, ``EvaluationError`` when no case could be evaluated (after
    writing ``failures.csv``).
    """
    cfg = cfg or Config()
    pred_dir, manifest_path, out_dir = Path(pred_dir), Path(manifest_path), Path(out_dir)
    if not pred_dir.is_dir():
        raise InputFileError(pred_dir, "prediction folder not found")
    regions = regions_from_config(cfg)
    # files are checked per case: a missing one fails its case, not the manifest (images are not read)
    rows = read_manifest(manifest_path, check_files=False) if cases is None else cases
    manifest_cases = select_cases(rows, cfg.evaluation.split, manifest_path)
    not_predicted: list[str] = []
    predicted = [c for c in manifest_cases if has_prediction(pred_dir, c.case_id)] if skip_unpredicted else []
    if predicted:  # (none at all: every case fails below, naming the file it expected)
        not_predicted = [c.case_id for c in manifest_cases if c not in predicted]
        if not_predicted:
            log.info("%d labelled case(s) have no prediction in %s and are not scored: %s", len(not_predicted),
                     pred_dir, ", ".join(not_predicted[:5]) + (", ..." if len(not_predicted) > 5 else ""))
        manifest_cases = predicted

    per_region: dict[str, list[RegionResult]] = {r.name: [] for r in regions}
    cases: list[Case] = []
    failures: list[tuple[str, str]] = []
    for case in tqdm(manifest_cases, desc="evaluate", unit="case", disable=not progress_enabled(progress)):
        try:
            results = evaluate_case(case, pred_dir, cfg, regions)
        except Exception as exc:  # noqa: BLE001 - one bad case must not stop the others
            error = str(exc) if isinstance(exc, MedsegError) else f"{type(exc).__name__}: {exc}"
            log.warning("case %s failed: %s", case.case_id, error)
            failures.append((case.case_id, error))
            continue
        cases.append(case)
        for region, result in zip(regions, results, strict=True):
            per_region[region.name].append(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_csv(out_dir / FAILURES_FILE, pd.DataFrame(failures, columns=["case_id", "error"]))
    if not cases:
        first_id, first_error = failures[0]
        raise EvaluationError(
            f"{pred_dir}: none of the {len(failures)} case(s) could be evaluated (see {out_dir / FAILURES_FILE}); "
            f"first: case {first_id}: {first_error}"
        )

    case_ids = [c.case_id for c in cases]
    dataset, curve_rows = summarise_dataset(per_region, case_ids, cfg)
    if dataset["score_source"] == "none":
        log.warning(
            "no detection scores in %s: AP ranks lesions by volume only (score_source none)", pred_dir
        )
    elif dataset["score_source"] == "mixed":
        log.warning(
            "cases differ in score source %s: the pooled AP ranking mixes score kinds",
            sorted(dataset["score_source_counts"]),
        )
    summary = {
        "medseg_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "pred_dir": str(pred_dir),
        "manifest": str(manifest_path),
        "n_cases": len(cases),
        "case_ids": case_ids,
        "n_failed": len(failures),
        "failures": [{"case_id": c, "error": e} for c, e in failures],
        "n_not_predicted": len(not_predicted),
        "not_predicted": not_predicted,
        "regions": [r.name for r in regions],
        **dataset,
        "config": cfg.model_dump(mode="json"),
    }
    summary = json_safe(summary)
    write_tables(out_dir, [per_region[r.name] for r in regions], curve_rows, summary)
    return summary


def write_tables(
    out_dir: Path,
    results: Sequence[Sequence[RegionResult]],
    curve_rows: list[dict[str, Any]],
    summary: dict[str, Any],
) -> None:
    """Write the four output files (each atomically). ``results[region][case]``; rows go out case by case."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_case = list(zip(*results, strict=True))
    rows = [r.row for case in by_case for r in case]
    atomic.write_csv(out_dir / EVAL_PER_CASE, pd.DataFrame(rows))
    lesion_rows = [lr for case in by_case for r in case for lr in r.lesion_rows]
    atomic.write_csv(out_dir / EVAL_LESION_MATCHES, pd.DataFrame(lesion_rows, columns=LESION_TABLE_COLUMNS))
    atomic.write_csv(out_dir / EVAL_PR_CURVE, pd.DataFrame(curve_rows, columns=PR_CURVE_COLUMNS))
    atomic.write_text(out_dir / EVAL_SUMMARY, json.dumps(summary, indent=2, allow_nan=False) + "\n")
