"""Cost and effect of a model folder's fold ensemble, and of cheaper ways to run it, in one process.

For each cross-validation patient of a model folder (``folds.json``; the manifest it was trained
on, default ``<folder>/../import/manifest.csv``), the case is read and preprocessed once, then,
interleaved over ``--rounds`` rounds (best time kept), each variant predicts it through medseg's
own ``CasePredictor`` (``probabilities`` timed = the network part; ``finish`` = the mask
``medseg infer`` writes, post-processed with the folder's chosen rule, on the source grid):

- ``reference``: the full fp32 torch ensemble (every fold on every slice): the masks every
  variant is compared with (``dice_to_ensemble``);
- ``single``: the fold model that held the patient out (its out-of-fold model), torch, the
  folder's precision (``auto``: bf16 autocast on CPUs with fast bf16);
- ``ensemble``: every fold model on every slice (``inference.cascade=false``), same precision;
- ``cascade``: the fold-ensemble cascade (:mod:`medseg.inference.cascade`) with the settings given;
- ``single <backend-precision>`` / ``cascade <backend-precision>``: the same with each compiled
  variant ``medseg accelerate`` accepted for the folder (``--no-backends`` leaves them out);
- more variants: add an entry to :func:`variants`.

Per case and variant: network seconds, ratio to ``single``, Dice of the mask to the full
ensemble's mask and to the reference label (whole tumour = label > 0; only ``single`` is out of
fold there: every other fold model trained on the patient), fraction of slices / slice x pixel
work the cascade's other models skipped, ``work``: the network work in one-model units computed
from what ran (``1 + (M - 1) * (1 - pixels_skipped)`` for a cascade of M models; independent of
the machine's load, so a check on timings taken on a busy machine), peak RSS while the variant ran
(sampled every 5 ms).
Prints a markdown table and a JSON summary (``--json FILE`` also writes it).

``--sweep``: instead of one cascade setting, every (``--thresholds`` x ``--margin-slices-list`` x
``--margin-px-list``) combination; per combination the minimum Dice to the ensemble over the patients,
the aggregate cost (sum of cascade seconds / sum of single seconds) and the worst patient's ratio;
a combination passes when every patient has Dice >= ``--min-dice`` (0.995) and the aggregate cost
is <= ``--max-cost`` (1.5); the cheapest passing one is suggested. Timings need a quiet machine.

Usage::

    .venv/bin/python benchmarks/bench_ensemble.py [--model runs/qc_brats/model] [--cases 3] [--rounds 2]
    .venv/bin/python benchmarks/bench_ensemble.py --sweep --thresholds 0.02,0.05,0.1 \\
        --margin-slices-list 0,1,2,4 --margin-px-list -1,32,128 --rounds 2   # -1: whole slices
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import resource
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from medseg.auto.folds import read_folds
from medseg.auto.model_folder import read_model_folder
from medseg.comparison import markdown_table
from medseg.inference.backends import read_backends_record
from medseg.inference.bundle import InferenceBundle
from medseg.inference.case import CasePredictor, PreparedCase
from medseg.inference.cases import InferenceCase, cases_from_manifest
from medseg.inference.runner import load_bundle
from medseg.labels import read_label
from medseg.manifest import read_manifest
from medseg.metrics.voxel import voxel_metrics
from medseg.outputs import BACKENDS_RECORD

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "runs" / "qc_brats" / "model"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Voxel Dice of two masks (nonzero = foreground; both empty: 1)."""
    return voxel_metrics(a > 0, b > 0, (1.0, 1.0, 1.0), distances=False).dice


class RssPeak:
    """Peak resident set size (MB) of this process while a block runs, sampled from /proc every
    ``interval`` seconds in a thread (``ru_maxrss`` only knows the whole process's peak)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()

    @staticmethod
    def current_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self.current_mb())

    @contextmanager
    def measure(self) -> Iterator[RssPeak]:
        self.peak_mb, self._stop = self.current_mb(), threading.Event()
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.peak_mb = max(self.peak_mb, self.current_mb())


@dataclasses.dataclass
class Variant:
    """One way to run the folder: its bundle (models shared with the others) and its label."""

    name: str
    bundle: InferenceBundle
    cascade: dict[str, float] | None = None  # the cascade settings, for the sweep's table


def with_inference(bundle: InferenceBundle, models: list | None = None, checkpoints: list | None = None,
                   **settings: Any) -> InferenceBundle:
    """``bundle`` with other inference settings and/or a subset of its models (no reloading)."""
    inference = bundle.config.inference.model_copy(update=settings)
    inference = type(inference).model_validate(inference.model_dump())  # validated like a loaded config
    config = bundle.config.model_copy(update={"inference": inference})
    return dataclasses.replace(bundle, config=config, models=models if models is not None else bundle.models,
                               checkpoints=checkpoints if checkpoints is not None else bundle.checkpoints)


def variants(ensemble: InferenceBundle, fold: int, cascades: list[dict[str, Any]],
             compiled: dict[str, InferenceBundle]) -> list[Variant]:
    """The variants timed for a patient held out by ``fold``. ``ensemble`` is loaded with the
    folder's settings (precision ``auto``: bf16 autocast on CPUs with fast bf16). ``reference``:
    the full fp32 torch ensemble every variant's mask is compared with; ``single``: that fold's
    model alone (torch, the folder's precision); ``ensemble``: every model on every slice; one
    cascade per entry of ``cascades``; per compiled variant accepted by ``medseg accelerate``
    (``compiled``): its single model and its cascade. Add new variants here."""
    out = [Variant("reference", with_inference(ensemble, cascade=False, precision="fp32")),
           Variant("single", with_inference(ensemble, [ensemble.models[fold]], [ensemble.checkpoints[fold]])),
           Variant("ensemble", with_inference(ensemble, cascade=False))]
    for c in cascades:
        name = "cascade" if len(cascades) == 1 else "cascade t={threshold} s={margin_slices} px={margin_px}".format(**c)
        out.append(Variant(name, with_inference(ensemble, cascade=True, cascade_threshold=c["threshold"],
                                                cascade_margin_slices=int(c["margin_slices"]),
                                                cascade_margin_px=c["margin_px"]), c))
    for name, bundle in compiled.items():
        out.append(Variant(f"single {name}", with_inference(bundle, [bundle.models[fold]], [bundle.checkpoints[fold]])))
        c = cascades[0]
        out.append(Variant(f"cascade {name}", with_inference(bundle, cascade=True, cascade_threshold=c["threshold"],
                                                             cascade_margin_slices=int(c["margin_slices"]),
                                                             cascade_margin_px=c["margin_px"])))
    return out


def run_variant(predictor: CasePredictor, prepared: PreparedCase) -> tuple[float, np.ndarray, dict[str, Any]]:
    """Network seconds, the post-processed source-grid mask, and the cascade's record (or {})."""
    prepared.cascade = None
    prob, seconds = predictor.probabilities(prepared)
    stats = prepared.cascade.as_record() if prepared.cascade is not None else {}
    result = predictor.finish(prepared, prob, seconds)
    return seconds, result.mask, stats


def bench_case(case: InferenceCase, fold: int, ensemble: InferenceBundle, cascades: list[dict[str, Any]],
               compiled: dict[str, InferenceBundle], rounds: int, label: Path | None,
               say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Rows (one per variant) of one patient."""
    todo = variants(ensemble, fold, cascades, compiled)
    reader = CasePredictor(ensemble)
    prepared = reader.prepare(case)
    predictors = {v.name: CasePredictor(v.bundle) for v in todo}
    for predictor in predictors.values():
        predictor.chain = reader.chain  # the inversion to the source grid needs the chain that preprocessed
    seconds: dict[str, list[float]] = {v.name: [] for v in todo}
    masks: dict[str, np.ndarray] = {}
    stats: dict[str, dict[str, Any]] = {}
    rss: dict[str, float] = {}
    sampler = RssPeak()
    for _ in range(rounds):
        for v in todo:
            with sampler.measure():
                t, mask, record = run_variant(predictors[v.name], prepared)
            seconds[v.name].append(t)
            masks[v.name], stats[v.name] = mask, record
            rss[v.name] = max(rss.get(v.name, 0.0), sampler.peak_mb)
    reference = read_label(label).array if label is not None else None
    single = min(seconds["single"])
    n_models = len(ensemble.models)
    rows = []
    for v in todo:
        best = min(seconds[v.name])
        skipped = stats[v.name].get("pixels_skipped")
        # network work in one-model units, from what ran (not timed: the same on a busy machine)
        work = len(v.bundle.models) if skipped is None else 1 + (n_models - 1) * (1 - skipped)
        rows.append({
            "case_id": case.case_id, "fold": fold, "variant": v.name, **(v.cascade or {}),
            "seconds": round(best, 3), "ratio": round(best / single, 3), "work": round(work, 3),
            "dice_to_ensemble": round(dice(masks[v.name], masks["reference"]), 5),
            "dice_to_reference": round(dice(masks[v.name], reference), 4) if reference is not None else None,
            "slices_skipped": stats[v.name].get("slices_skipped"), "pixels_skipped": stats[v.name].get("pixels_skipped"),
            "peak_rss_mb": round(rss[v.name], 1),
        })
        say(f"{case.case_id} (fold {fold}) {v.name}: {best:.2f} s ({best / single:.2f}x single), Dice to ensemble "
            f"{rows[-1]['dice_to_ensemble']:.4f}, skipped {rows[-1]['slices_skipped']}")
    return rows


def sweep_summary(frame: pd.DataFrame, min_dice: float, max_cost: float) -> pd.DataFrame:
    """Per cascade setting: worst Dice to the ensemble, aggregate and worst cost, mean skipped."""
    single = frame[frame.variant == "single"].set_index("case_id").seconds
    cascades = frame[frame.variant.str.startswith("cascade")].copy()
    cascades["single_seconds"] = cascades.case_id.map(single)
    rows = []
    cascades["margin_px"] = cascades["margin_px"].fillna(-1)  # -1: whole slices
    for (t, s, px), group in cascades.groupby(["threshold", "margin_slices", "margin_px"]):
        cost = group.seconds.sum() / group.single_seconds.sum()
        rows.append({"threshold": t, "margin_slices": int(s), "margin_px": int(px),
                     "min_dice_to_ensemble": group.dice_to_ensemble.min(), "cost": round(cost, 3),
                     "worst_ratio": group.ratio.max(), "mean_work": round(group.work.mean(), 3),
                     "worst_work": group.work.max(), "mean_slices_skipped": round(group.slices_skipped.mean(), 4),
                     "mean_pixels_skipped": round(group.pixels_skipped.mean(), 4),
                     "passes": bool(group.dice_to_ensemble.min() >= min_dice and cost <= max_cost)})
    return pd.DataFrame(rows).sort_values(["passes", "cost"], ascending=[False, True]).reset_index(drop=True)


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a model folder (auto pipeline's model/)")
    parser.add_argument("--manifest", type=Path, help="the pool manifest (default: <model>/../import/manifest.csv)")
    parser.add_argument("--cases", type=int, default=None, help="only the first N CV patients")
    parser.add_argument("--rounds", type=int, default=2, help="timings interleaved over N rounds, best kept")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--threshold", type=float, default=None, help="cascade_threshold (default: the folder's config)")
    parser.add_argument("--margin-slices", type=int, default=None, help="cascade_margin_slices")
    parser.add_argument("--margin-px", type=int, default=None, help="cascade_margin_px (-1: whole slices)")
    parser.add_argument("--sweep", action="store_true", help="every combination of the lists below")
    parser.add_argument("--thresholds", default="0.02,0.05,0.1,0.2")
    parser.add_argument("--margin-slices-list", dest="margin_slices_list", default="0,1,2,4")
    parser.add_argument("--margin-px-list", dest="margin_px_list", default="-1,32,128",
                        help="-1: whole slices (exact for networks with global pooling)")
    parser.add_argument("--min-dice", type=float, default=0.995)
    parser.add_argument("--max-cost", type=float, default=1.5)
    parser.add_argument("--json", type=Path, help="also write the JSON summary here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="inference.key=value")
    parser.add_argument("--no-backends", action="store_true", help="leave out the folder's accepted compiled variants")
    parser.add_argument("--backends", default=None, help="only these accepted variants, e.g. onnxruntime-int8,openvino-bf16")
    args = parser.parse_args(argv)
    logging.getLogger("medseg").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)

    folder = read_model_folder(args.model)
    manifest = args.manifest or args.model.parent / "import" / "manifest.csv"
    folds = read_folds(folder.path / folder.record["folds"])
    names = [p.stem for p in folder.checkpoints]
    if names != [f"fold_{k}" for k in range(folds.n_folds)]:
        raise SystemExit(f"expected checkpoints fold_0..fold_{folds.n_folds - 1}, got {names}")
    ensemble = load_bundle(folder.checkpoints, args.overrides, settings={**folder.postprocess, "backend": "torch"},
                           model_dir=folder.path)
    base = ensemble.inference
    compiled: dict[str, InferenceBundle] = {}
    if not args.no_backends and (folder.path / BACKENDS_RECORD).is_file():
        for entry in read_backends_record(folder.path)["entries"].values():
            name = f"{entry['backend']}-{entry['precision']}"
            if entry.get("accepted") and (args.backends is None or name in args.backends.split(",")):
                settings = {**folder.postprocess, "backend": entry["backend"], "precision": entry["precision"],
                            "threads": args.threads}
                compiled[name] = load_bundle(
                    folder.checkpoints, args.overrides, settings=settings, model_dir=folder.path)
    if args.sweep:
        grid = itertools.product(parse_floats(args.thresholds), parse_floats(args.margin_slices_list),
                                 parse_floats(args.margin_px_list))
        cascades = [{"threshold": t, "margin_slices": int(s), "margin_px": None if px < 0 else int(px)} for t, s, px in grid]
    else:
        cascades = [{"threshold": args.threshold if args.threshold is not None else base.cascade_threshold,
                     "margin_slices": args.margin_slices if args.margin_slices is not None else base.cascade_margin_slices,
                     "margin_px": (None if args.margin_px < 0 else args.margin_px) if args.margin_px is not None
                     else base.cascade_margin_px}]
    rows_by_id = {c.case_id: c for c in read_manifest(manifest)}
    fold_of = folds.fold_of_patient()
    cases = [c for c in cases_from_manifest(manifest, ensemble.channels, ensemble.modality)
             if rows_by_id[c.case_id].patient_id in fold_of][: args.cases]
    print(f"{len(cases)} CV patient(s), {len(folder.checkpoints)} fold models, rule {folder.postprocess}, "
          f"{len(cascades)} cascade setting(s), {args.rounds} round(s), {args.threads} thread(s), "
          f"device {ensemble.device}, precision {base.precision}", flush=True)
    rows: list[dict[str, Any]] = []
    for case in cases:
        row = rows_by_id[case.case_id]
        rows += bench_case(case, fold_of[row.patient_id], ensemble, cascades, compiled, args.rounds, row.label,
                           lambda line: print(line, flush=True))
    frame = pd.DataFrame(rows)
    summary: dict[str, Any] = {
        "model": str(folder.path), "manifest": str(manifest), "cases": [c.case_id for c in cases],
        "rounds": args.rounds, "threads": args.threads, "device": str(ensemble.device),
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "min_dice": args.min_dice, "max_cost": args.max_cost,
    }
    if args.sweep:
        table = sweep_summary(frame, args.min_dice, args.max_cost)
        print("\n" + markdown_table(table))
        passing = table[table.passes]
        summary["sweep"] = table.to_dict(orient="records")
        summary["suggested"] = passing.iloc[0].to_dict() if len(passing) else None
        print(f"\nsuggested: {summary['suggested']}" if len(passing) else "\nno setting passes")
    else:
        print("\n" + markdown_table(frame.drop(columns=["threshold", "margin_slices", "margin_px"], errors="ignore")))
        by_variant = frame.groupby("variant", sort=False)
        single_total = frame[frame.variant == "single"].seconds.sum()
        summary["variants"] = {
            name: {"cost": round(g.seconds.sum() / single_total, 3), "median_ratio": float(g.ratio.median()),
                   "mean_work": round(float(g.work.mean()), 3),
                   "min_dice_to_ensemble": float(g.dice_to_ensemble.min()),
                   "mean_dice_to_reference": None if g.dice_to_reference.isna().all() else round(float(g.dice_to_reference.mean()), 4),
                   "mean_slices_skipped": None if g.slices_skipped.isna().all() else round(float(g.slices_skipped.mean()), 4),
                   "peak_rss_mb": float(g.peak_rss_mb.max())}
            for name, g in by_variant
        }
        summary["cascade_settings"] = cascades[0]
    summary["rows"] = rows
    text = json.dumps(summary, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    print("\n" + text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
