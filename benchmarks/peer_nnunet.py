"""nnU-Net v2 beside medseg: the same patients, folds and training budget, scored by medseg's code.

Usage (medseg venv; nnU-Net runs in its own venv through ``--nnunet-python``)::

    .venv/bin/python benchmarks/peer_nnunet.py --run runs/qc_brats --work /tmp/peer_qc \\
        --nnunet-python /work/nnunet-venv/bin/python [--configurations 2d 3d_fullres] \\
        [--folds 0 1 2 3 4] [--minutes-per-fold M] [--out /tmp/peer_qc/peer_nnunet.md]

Steps, each skipped when ``--work`` already holds its result for the same inputs (so a stopped
run resumes; ``--force`` trains again):

1. the run's pool cases (``import/manifest.csv``) become an nnU-Net raw dataset
   (:func:`medseg.nnunet_export.export_nnunet`, labels mapped by the run's ``data.labels``) and its
   ``cv/folds.json`` nnU-Net's ``splits_final.json`` (:func:`medseg.nnunet_export.write_splits`);
2. nnU-Net fingerprint + planning + preprocessing (``peer_nnunet_worker.py plan/preprocess``,
   ``--processes`` processes), ``splits_final.json`` copied into the preprocessed dataset;
3. per fold and configuration: training with ``nnUNetTrainerBudget`` (its schedule fitted to the
   budget, ``peer_budget.py``), then the held-out patients predicted with ``nnUNetPredictor``
   with mirroring (nnU-Net's default) and without. A ``3d*`` configuration runs only when a
   synthetic step says the budget holds at least ``MIN_3D_ITERATIONS`` iterations, else it is
   recorded as ``skipped: budget holds N iterations``;
4. each setting's masks scored by :func:`medseg.auto.cross_validation.evaluate_oof` (the code that
   writes medseg's ``cv_table.csv``: Dice, HD95, lesion F1 ...) and set beside medseg's
   out-of-fold table with :func:`medseg.comparison.compare_runs` (means with 95 % patient-
   bootstrap intervals, paired differences medseg - nnU-Net with their intervals, wins/losses).

Budget: ``--minutes-per-fold``, else the run's ``pipeline.yaml`` stage ``plan`` option
``minutes_per_fold``, else medseg's planning default for the run's device; the output says which.
Threads: torch threads and nnU-Net's augmentation workers (``nnUNet_n_proc_DA``) default to the
run's ``train.threads`` and ``train.num_workers`` (the resources medseg trained with).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from medseg.auto.cross_validation import evaluate_oof
from medseg.auto.folds import FoldAssignment, cv_pool, read_folds
from medseg.auto.planning import DEFAULT_MINUTES
from medseg.comparison import RunTable, compare_runs, display_tables, markdown_table, read_run
from medseg.config import Config, load_config
from medseg.errors import MedsegError
from medseg.manifest import Case, read_manifest
from medseg.nnunet_export import FILE_ENDING, SPLITS_FILE, export_nnunet, write_splits
from medseg.outputs import mask_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_budget import iterations_in_budget  # noqa: E402

WORKER = Path(__file__).resolve().parent / "peer_nnunet_worker.py"
MIN_3D_ITERATIONS = 300
METRICS = ("dice", "hd95_mm", "lesion_f1")
SHOWN = re.compile(r"peer:|budget:|Epoch time|ERROR|Error")


class BenchmarkError(MedsegError):
    """A step of the benchmark failed (an nnU-Net step, a missing run file)."""


@dataclass
class RunInputs:
    """What the benchmark reads from a medseg run folder."""

    cases: list[Case]
    folds: FoldAssignment
    folds_path: Path
    cfg: Config
    minutes: float
    minutes_source: str
    medseg_table: Path
    medseg_table_note: str


def resolve_run(run: Path, minutes: float | None, table: str) -> RunInputs:
    """Manifest, folds, config, budget and medseg's out-of-fold table of the run folder ``run``."""
    config_path = next((p for p in (run / "model" / "config.yaml", run / "config.yaml") if p.is_file()), None)
    if config_path is None:
        raise BenchmarkError(f"{run}: no model/config.yaml or config.yaml (is it a medseg auto/cv run folder?)")
    cfg = load_config(config_path)
    manifest = run / "import" / "manifest.csv"
    manifest = manifest if manifest.is_file() else Path(cfg.data.manifest or "")
    if not manifest.is_file():
        raise BenchmarkError(f"{run}: no import/manifest.csv and data.manifest of {config_path} is not a file")
    folds_path = run / "cv" / "folds.json"
    if not folds_path.is_file():
        raise BenchmarkError(f"{folds_path}: not found; the benchmark needs the run's cross-validation folds")
    cases = read_manifest(manifest)
    folds = read_folds(folds_path)
    pool = sorted(c.case_id for c in cv_pool(cases))
    if pool != sorted(folds.case_ids):
        raise BenchmarkError(f"{folds_path}: its pool ({len(folds.case_ids)} cases) is not the manifest's ({len(pool)}, {manifest})")
    source = "--minutes-per-fold"
    if minutes is None:
        spec = yaml.safe_load((run / "pipeline.yaml").read_text()) if (run / "pipeline.yaml").is_file() else {}
        plan = next((s for s in (spec or {}).get("stages", []) if s.get("name") == "plan"), {})
        minutes = (plan.get("options") or {}).get("minutes_per_fold")
        source = f"{run / 'pipeline.yaml'}: stage plan, minutes_per_fold"
        if minutes is None:
            device = "cuda" if cfg.train.device.startswith("cuda") else "cpu"
            minutes, source = DEFAULT_MINUTES[device], f"medseg planning default for {device} (no minutes_per_fold in the run)"
    chosen = run / "model" / "cv_chosen"
    if table == "chosen" and (chosen / "cv_table.csv").is_file():
        return RunInputs(cases, folds, folds_path, cfg, float(minutes), source, chosen,
                         f"{chosen / 'cv_table.csv'} (out-of-fold, with the post-processing chosen on these same "
                         "out-of-fold predictions)")  # fmt: skip
    raw = run / "cv" / "cv_table.csv"
    if not raw.is_file():
        raise BenchmarkError(f"{raw}: not found; medseg's out-of-fold table is needed")
    return RunInputs(cases, folds, folds_path, cfg, float(minutes), source, run / "cv",
                     f"{raw} (out-of-fold, the plan's post-processing)")  # fmt: skip


class Worker:
    """Runs ``peer_nnunet_worker.py`` steps in the nnU-Net venv; each result cached under ``work/steps``."""

    def __init__(self, python: str, work: Path, dataset_id: int, threads: int, da_workers: int, force: bool):
        self.python, self.work, self.dataset_id, self.force = python, work, dataset_id, force
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self.env.update({
            "nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
            "nnUNet_results": str(work / "nnUNet_results"), "nnUNet_n_proc_DA": str(da_workers),
            "nnUNet_compile": "false", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
        })  # fmt: skip
        self.threads = threads
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def cached(self, name: str, key: str) -> dict | None:
        path = self.work / "steps" / f"{name}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            if result.get("key") == key:
                return result
        return None

    def run(self, step: str, name: str, *args: str, key: str) -> dict:
        """Run ``step`` (its result cached as ``steps/<name>.json`` for inputs ``key``)."""
        if not (self.force and step == "train") and (hit := self.cached(name, key)) is not None:
            print(f"  {name}: done before (cached in {self.work / 'steps'})")
            return hit
        result_path = self.work / "steps" / f"{name}.json"
        result_path.unlink(missing_ok=True)
        cmd = [self.python, str(WORKER), step, "--dataset-id", str(self.dataset_id), "--result", str(result_path),
               "--threads", str(self.threads), *args]  # fmt: skip
        log_path = self.work / "logs" / f"{name}.log"
        tail: deque[str] = deque(maxlen=40)
        with open(log_path, "w", encoding="utf-8") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
                                    cwd=self.work)  # fmt: skip
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                tail.append(line)
                if SHOWN.search(line):
                    print("    " + line.rstrip(), flush=True)
            code = proc.wait()
        if code != 0 or not result_path.is_file():
            raise BenchmarkError(f"nnU-Net step {name} failed (exit {code}); full log: {log_path}; last lines:\n"
                                 + "".join(tail))  # fmt: skip
        result = json.loads(result_path.read_text())
        result["key"] = key
        result_path.write_text(json.dumps(result, indent=2))
        return result


def digest(*parts: object) -> str:
    """Short hash of ``parts`` (the inputs a cached step result depends on)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_key(inputs: RunInputs, dataset_id: int) -> str:
    """What planning and preprocessing depend on: the pool's cases and files, labels, folds, dataset id."""
    cases = [(c.case_id, [str(p) for p in c.images.values()], str(c.label)) for c in cv_pool(inputs.cases)]
    return digest(sorted(cases), inputs.cfg.data.labels.model_dump(mode="json"), inputs.folds_path.read_text(), dataset_id)


def batch_sizes(items: list[str]) -> dict[str, int]:
    """``["2d=8"]`` -> ``{"2d": 8}`` (``ValueError`` naming the bad item)."""
    sizes = {}
    for item in items:
        cfg, _, n = item.partition("=")
        if not cfg or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--batch-size {item!r}: write CONFIGURATION=N, e.g. 2d=8")
        sizes[cfg] = int(n)
    return sizes


def add_batch_configurations(plans_path: Path, sizes: dict[str, int]) -> dict[str, str]:
    """Add ``<cfg>_bs<N>`` configurations to nnU-Net's plans file, inheriting everything from
    ``<cfg>`` but the batch size (nnU-Net's documented way to change one plan setting; the
    preprocessed data is shared). Returns configuration -> name to train."""
    plans = json.loads(plans_path.read_text())
    names = {}
    for cfg, n in sizes.items():
        if cfg not in plans["configurations"]:
            raise BenchmarkError(f"{plans_path}: no configuration {cfg!r} to change the batch size of "
                                 f"(planned: {sorted(plans['configurations'])})")  # fmt: skip
        names[cfg] = f"{cfg}_bs{n}"
        plans["configurations"][names[cfg]] = {"inherits_from": cfg, "batch_size": n}
    plans_path.write_text(json.dumps(plans, indent=2))
    return names


def medseg_timings(run: Path, folds: FoldAssignment) -> dict[int, dict[str, float | None]]:
    """Per fold: medseg's training seconds (``cv/cv_summary.json``) and mean inference seconds per
    held-out case (the ``case X done: ... N s`` lines of ``run.log``; None when absent)."""
    summary_path = run / "cv" / "cv_summary.json"
    seconds = json.loads(summary_path.read_text()).get("fold_training_seconds") if summary_path.is_file() else None
    fold_of = {cid: k for k, group in enumerate(folds.patients) for cid in group}
    per_case: dict[int, list[float]] = {}
    log = run / "run.log"
    if log.is_file():
        for m in re.finditer(r"medseg\.inference\.batch: case (\S+) done: .*?([0-9.]+) s$", log.read_text(), re.M):
            if m.group(1) in fold_of:
                per_case.setdefault(fold_of[m.group(1)], []).append(float(m.group(2)))
    return {k: {"train_s": seconds[k] if seconds and k < len(seconds) else None,
                "infer_s_per_case": sum(per_case[k]) / len(per_case[k]) if per_case.get(k) else None}
            for k in range(folds.n_folds)}  # fmt: skip


def score(setting: str, pred_dir: Path, out_dir: Path, inputs: RunInputs, case_ids: list[str]) -> RunTable:
    """medseg's out-of-fold evaluation of nnU-Net's masks (``pred_dir/<case>.nii.gz`` of ``case_ids``)
    -> its table (``out_dir/cv_table.csv``, written by the code that writes medseg's)."""
    masks = out_dir / "masks"
    if masks.exists():
        shutil.rmtree(masks)
    masks.mkdir(parents=True)
    for case_id in case_ids:
        path = pred_dir / f"{case_id}{FILE_ENDING}"
        if not path.is_file():
            raise BenchmarkError(f"{path}: nnU-Net's prediction of held-out case {case_id} is missing")
        os.symlink(path.resolve(), mask_file(masks, case_id))
    evaluate_oof(inputs.cfg, out_dir, inputs.folds, inputs.cases, "cpu", progress=False, pred_dir=masks)
    return read_run(out_dir, label=setting)


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def report(inputs: RunInputs, args: argparse.Namespace, medseg: RunTable, tables: dict[str, RunTable],
           timing_rows: list[dict], notes: list[str]) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """Markdown, the per-patient CSV frame and the differences frame."""
    lines = ["# nnU-Net v2 beside medseg (same folds, same budget)", "", *[f"- {n}" for n in notes], ""]
    lines += ["## Timings per fold", "", markdown_table(pd.DataFrame(timing_rows).fillna("n/a")), ""]
    wide = medseg.cases[["patient_id", "fold"]].copy()
    for label, table in {"medseg": medseg, **tables}.items():
        for metric in METRICS:
            wide[f"{metric} {label}"] = table.cases[metric]
    keep = sorted(set().union(*(t.cases.index for t in tables.values())))
    wide = wide.loc[[c for c in wide.index if c in keep]].sort_values(["fold", "patient_id"])
    wide = wide.reset_index().rename(columns={"index": "case_id"})
    for metric in METRICS:
        cols = [c for c in wide.columns if c.startswith(metric + " ")]
        shown = wide[["case_id", "fold", *cols]].copy()
        digits = 2 if metric.endswith("_mm") else 4
        for c in cols:
            shown[c] = [fmt(v, digits) for v in shown[c]]
        lines += [f"## Per patient: {metric}", "", markdown_table(shown), ""]
    diff_frames = []
    for label, table in tables.items():
        comparison = compare_runs([table, medseg], list(METRICS))
        for title, frame in display_tables(comparison).items():  # baseline = nnU-Net, run = medseg
            if title == "Runs":
                continue
            title = title.replace(f"against {label}", "medseg - nnU-Net").replace("baseline -> run", "nnU-Net -> medseg")
            dropped = ["run - baseline"] if title == "Means" else ["run", "run - baseline"]  # the title names them
            frame = frame.drop(columns=dropped, errors="ignore").rename(columns={
                "baseline -> run": "nnU-Net -> medseg", "better / worse / tied patients": "medseg better / worse / tied"})  # fmt: skip
            lines += [f"## {label}: {title}", "", markdown_table(frame), ""]
        diff_frames.append(comparison.differences.assign(nnunet=label))
        lines += [f"- {n}" for n in comparison.notes]
    differences = pd.concat(diff_frames, ignore_index=True) if diff_frames else pd.DataFrame()
    lines += ["Differences are medseg - nnU-Net per case; wins = patients where medseg is better (higher Dice "
              "and lesion F1, lower HD95); intervals: 95 % patient bootstrap (medseg.metrics.uncertainty).", ""]
    return "\n".join(lines), wide, differences


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="medseg auto/cv run folder (import/, cv/, model/)")
    p.add_argument("--work", required=True, type=Path, help="folder for nnU-Net's data, models and predictions")
    p.add_argument("--nnunet-python", default=os.environ.get("NNUNET_PYTHON"), help="python of the venv with nnunetv2")
    p.add_argument("--minutes-per-fold", type=float, default=None)
    p.add_argument("--configurations", nargs="+", default=["2d"])
    p.add_argument("--folds", nargs="+", type=int, default=None, help="default: every fold of cv/folds.json")
    p.add_argument("--dataset-id", type=int, default=990)
    p.add_argument("--batch-size", nargs="+", default=[], metavar="CFG=N",
                   help="override nnU-Net's planned batch size of a configuration, e.g. 2d=8 (a deviation, reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the run's train.threads)")
    p.add_argument("--da-workers", type=int, default=None, help="nnUNet_n_proc_DA (default: the run's train.num_workers)")
    p.add_argument("--processes", type=int, default=2, help="nnU-Net fingerprint/preprocessing processes")
    p.add_argument("--medseg-table", choices=["chosen", "raw"], default="chosen")
    p.add_argument("--out", type=Path, default=None, help="markdown report (default WORK/peer_nnunet.md); CSVs beside it")
    p.add_argument("--force", action="store_true", help="train again even when a fold's model exists")
    args = p.parse_args(argv)
    if not args.nnunet_python:
        p.error("--nnunet-python (or NNUNET_PYTHON) is required: the python of the venv where nnunetv2 is installed")
    logging.getLogger("medseg.evaluation.runner").setLevel(logging.ERROR)  # "no detection scores": nnU-Net writes masks only
    try:
        return run_benchmark(args)
    except (MedsegError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run_benchmark(args: argparse.Namespace) -> int:
    run, work = args.run.resolve(), args.work.resolve()
    inputs = resolve_run(run, args.minutes_per_fold, args.medseg_table)
    threads = args.threads or inputs.cfg.train.threads or 1
    da_workers = inputs.cfg.train.num_workers if args.da_workers is None else args.da_workers
    budget_s = inputs.minutes * 60.0
    folds = args.folds if args.folds is not None else list(range(inputs.folds.n_folds))
    name = re.sub(r"[^A-Za-z0-9_-]", "_", run.name) or "medseg"
    notes = [f"run {run}: {len(cv_pool(inputs.cases))} pool cases, {inputs.folds.n_folds} folds ({inputs.folds_path}); "
             f"folds benchmarked: {folds}",
             f"budget: {inputs.minutes:g} min ({budget_s:.0f} s) of training per fold, from {inputs.minutes_source}",
             f"nnU-Net: device {args.device}, torch threads {threads}, nnUNet_n_proc_DA {da_workers}, "
             f"batch size {', '.join(args.batch_size) or 'as planned'}",
             f"medseg table: {inputs.medseg_table_note}"]  # fmt: skip
    print("\n".join(notes), flush=True)
    sizes = batch_sizes(args.batch_size)
    prep_key = data_key(inputs, args.dataset_id)
    train_key = digest(prep_key, budget_s, args.device, threads, da_workers, sizes)
    worker = Worker(args.nnunet_python, work, args.dataset_id, threads, da_workers, args.force)
    pool = cv_pool(inputs.cases)
    dataset = export_nnunet(pool, work / "nnUNet_raw", args.dataset_id, name, inputs.cfg.data.labels)
    write_splits(inputs.folds_path, work / SPLITS_FILE)
    print(f"exported {len(pool)} cases to {dataset}", flush=True)
    plan = worker.run("plan", "plan", "--processes", str(args.processes), key=prep_key)
    preprocessed = work / "nnUNet_preprocessed" / dataset.name
    shutil.copyfile(work / SPLITS_FILE, preprocessed / SPLITS_FILE)
    trained_name = add_batch_configurations(preprocessed / "nnUNetPlans.json", sizes)
    for cfg, conf in plan["configurations"].items():
        notes.append(f"nnU-Net plan {cfg}: batch {conf['batch_size']}, patch {conf['patch_size']}, spacing {conf['spacing']}"
                     + (f" (trained with batch {sizes[cfg]})" if cfg in sizes else ""))  # fmt: skip
    notes.append(f"nnU-Net fingerprint {plan['fingerprint_s']} s, planning {plan['planning_s']} s (run once)")
    timing_rows, tables = [], {}
    medseg_times = medseg_timings(run, inputs.folds)
    fold_rows = {k: {"fold": k, "medseg train s": fmt(medseg_times[k]["train_s"], 1),
                     "medseg infer s/case": fmt(medseg_times[k]["infer_s_per_case"], 1)} for k in folds}  # fmt: skip
    held_out = [c.case_id for k in folds for c in inputs.folds.split(inputs.cases, k)[1]]
    for config in args.configurations:
        trained = trained_name.get(config, config)
        if config not in plan["configurations"]:
            notes.append(f"{config}: not in nnU-Net's plans ({sorted(plan['configurations'])}); skipped")
            continue
        if config.startswith("3d"):
            measured = worker.run("measure", f"measure_{trained}", "--configuration", trained, "--device", args.device,
                                  key=train_key)  # fmt: skip
            n = iterations_in_budget(measured["sec_per_iteration_estimate"], budget_s)
            if n < MIN_3D_ITERATIONS:
                line = (f"{trained} skipped: budget holds {n} iterations (< {MIN_3D_ITERATIONS}; about "
                        f"{measured['sec_per_iteration_estimate']} s per iteration, a synthetic-step estimate)")  # fmt: skip
                print(line, flush=True)
                notes.append(line)
                for k in folds:
                    fold_rows[k][f"{trained}"] = f"skipped: budget holds {n} iterations"
                continue
        prep = worker.run("preprocess", f"preprocess_{config}", "--configurations", config, "--processes",
                          str(args.processes), key=prep_key)  # fmt: skip
        notes.append(f"nnU-Net preprocessing {config}: {prep['preprocessing_s']} s (run once)")
        for mirroring in ("on", "off"):
            (work / "predictions" / f"{trained}_mirror_{mirroring}").mkdir(parents=True, exist_ok=True)
        for k in folds:
            print(f"fold {k}: nnU-Net {trained}, training for {budget_s:.0f} s", flush=True)
            tr = worker.run("train", f"train_{trained}_fold{k}", "--configuration", trained, "--fold", str(k),
                            "--budget-s", str(budget_s), "--device", args.device, key=train_key)  # fmt: skip
            held = inputs.folds.split(inputs.cases, k)[1]
            cases_json = work / "steps" / f"cases_fold{k}.json"
            cases_json.write_text(json.dumps([{"case_id": c.case_id, "files": [
                str(dataset / "imagesTr" / f"{c.case_id}_{i:04d}{FILE_ENDING}") for i in range(len(c.channels))]}
                for c in held]))  # fmt: skip
            row = fold_rows[k]
            sched = tr.get("initial_schedule", {})
            row[f"{trained} train s"] = fmt(tr.get("train_s"), 1)
            row[f"{trained} s/iter"] = fmt(tr.get("sec_per_iteration"), 3)
            row[f"{trained} epochs, iterations"] = f"{tr.get('epochs')}, {tr.get('iterations')}" + (
                " (floor, over budget)" if sched.get("over_budget") else "")
            for mirroring in ("on", "off"):
                out = work / "predictions" / f"{trained}_mirror_{mirroring}"
                pr = worker.run("predict", f"predict_{trained}_mirror_{mirroring}_fold{k}", "--configuration", trained,
                                "--fold", str(k), "--model-dir", str(Path(tr["output_folder"]).parent),
                                "--cases", str(cases_json), "--out", str(out), "--mirroring", mirroring,
                                "--device", args.device, key=digest(train_key, tr.get("train_s")))  # fmt: skip
                secs = list(pr["case_seconds"].values())
                row[f"{trained} mirror {mirroring} infer s/case"] = fmt(sum(secs) / len(secs), 1) if secs else "n/a"
        for mirroring in ("on", "off"):
            label = f"nnU-Net {trained} mirror {mirroring}"
            tables[label] = score(label, work / "predictions" / f"{trained}_mirror_{mirroring}",
                                  work / "scored" / f"{trained}_mirror_{mirroring}", inputs, held_out)  # fmt: skip
    timing_rows = [fold_rows[k] for k in folds]
    medseg = read_run(inputs.medseg_table, label="medseg")
    out = args.out or work / "peer_nnunet.md"
    if not tables:
        print("no nnU-Net configuration ran; nothing to compare", flush=True)
        text = "\n".join(["# nnU-Net v2 beside medseg", "", *[f"- {n}" for n in notes], ""])
        out.write_text(text)
        return 0
    text, wide, differences = report(inputs, args, medseg, tables, timing_rows, notes)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    wide.to_csv(out.with_suffix(".csv"), index=False)
    differences.to_csv(out.with_name(out.stem + "_differences.csv"), index=False)
    print(text, flush=True)
    print(f"wrote {out}, {out.with_suffix('.csv')}, {out.with_name(out.stem + '_differences.csv')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
