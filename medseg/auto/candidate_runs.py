"""The ``cv`` stage with ``cv.candidates``: one cross-validation per candidate, the choice
(:mod:`medseg.auto.candidates`), and the chosen combination's out-of-fold set in ``cv/``.

Layout of ``cv_dir``::

    candidates/<name>/     the candidate's full cross-validation (run_cross_validation's layout)
                           + config.yaml (its resolved config); with ``cv.try_tta`` also
                           oof_tta/ (its out-of-fold cases predicted with mirroring)
    candidates.json        the choice; candidates_table.csv: every combination's scores
    folds.json             the folds (the same for every candidate: checked)
    oof/                   the chosen combination's out-of-fold probabilities (averaged)
    evaluation/, cv_table.csv, cv_summary.json   their evaluation under the run's rule

Resuming is the candidates' own (finished folds are not trained again); the choice and the
averaged maps are recomputed, which costs reading the maps once.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from pathlib import Path

import numpy as np

from medseg.atomic import write_json
from medseg.auto.candidates import (
    CandidateChoice,
    candidate_config,
    candidate_dir,
    choose_combination,
    choose_tta,
    combination_name,
    read_choice,
    score_combinations,
    write_choice,
)
from medseg.auto.cross_validation import (
    OOF_DIR,
    CVResult,
    evaluate_postprocessed,
    fold_models,
    predict_fold,
    run_cross_validation,
)
from medseg.auto.folds import FOLDS_FILE, cv_pool, read_folds
from medseg.config import Config, dump_config
from medseg.errors import MedsegError
from medseg.manifest import Case, read_manifest
from medseg.outputs import CV_SUMMARY, RUN_CONFIG, prob_file

log = logging.getLogger(__name__)

TTA_OOF_DIR = "oof_tta"


def run_candidates(cfg: Config, manifest: str | Path, cv_dir: str | Path, progress: bool = True) -> CVResult:
    """Cross-validate every candidate of ``cfg.cv.candidates``, choose, and write the chosen
    combination's out-of-fold set and evaluation into ``cv_dir`` (module docstring)."""
    out = Path(cv_dir)
    out.mkdir(parents=True, exist_ok=True)
    candidates = cfg.cv.candidates
    configs = {c.name: candidate_config(cfg, c) for c in candidates}
    results: dict[str, CVResult] = {}
    for candidate in candidates:
        name, ccfg = candidate.name, configs[candidate.name]
        log.info("cv: candidate %s (%s)", name, ", ".join(f"{k}={v}" for k, v in candidate.set.items()) or "the run's config")
        folder = candidate_dir(out, name)
        results[name] = run_cross_validation(ccfg, manifest, folder, progress)
        dump_config(ccfg, folder / RUN_CONFIG)
    folds_text = {name: (candidate_dir(out, name) / FOLDS_FILE).read_text(encoding="utf-8") for name in configs}
    if len(set(folds_text.values())) != 1:
        raise MedsegError(f"{out}: the candidates' folds differ ({sorted(folds_text)}); they must share cv.folds and cv.seed")
    shutil.copyfile(candidate_dir(out, candidates[0].name) / FOLDS_FILE, out / FOLDS_FILE)

    all_cases = read_manifest(manifest)
    cases = [c for c in cv_pool(all_cases)
             if all(prob_file(candidate_dir(out, n) / OOF_DIR, c.case_id).is_file() for n in configs)]
    if not cases:
        raise MedsegError(f"{out}: no pool case has an out-of-fold probability from every candidate")
    patients = [c.patient_id for c in cases]
    names = list(configs)
    combos = [(n,) for n in names] + (list(itertools.combinations(names, 2)) if cfg.cv.ensemble_pairs else [])
    dice = score_combinations(cases, {n: candidate_dir(out, n) / OOF_DIR for n in names}, combos, cfg)
    choice = choose_combination(dice, patients, names, cfg.cv.ensemble_pairs, cfg.cv.selection_min_gain)
    if cfg.cv.try_tta:
        choice = _try_tta(cfg, configs, choice, out, all_cases, cases, patients, progress)
    for reason in choice.reasons:
        log.info("cv: %s", reason)
    write_choice(choice, out, candidates)

    oof_name = TTA_OOF_DIR if choice.tta else OOF_DIR
    _write_averaged(cases, [candidate_dir(out, n) / oof_name for n in choice.names], out / OOF_DIR)
    chosen_cfg = configs[choice.names[0]].model_copy(deep=True)
    chosen_cfg.data.manifest = str(manifest)
    summary = evaluate_postprocessed(chosen_cfg, out, cases, out, progress)
    summary["candidates"] = {"chosen": list(choice.names), "tta": choice.tta, "reasons": choice.reasons}
    seconds = [results[n].summary.get("fold_training_seconds") or [] for n in choice.names]
    if all(len(s) == len(seconds[0]) and all(v is not None for v in s) for s in seconds):
        summary["fold_training_seconds"] = [float(sum(v)) for v in zip(*seconds, strict=True)]
    summary["what"] += f" (candidates: {choice.name} chosen on these predictions)"
    write_json(out / CV_SUMMARY, summary)
    failures = [f for r in results.values() for f in r.failures]
    models, _ = chosen_models(out, read_folds(out / FOLDS_FILE).n_folds, cfg.cv.repeats)
    return CVResult(out, read_folds(out / FOLDS_FILE), models, summary, failures)


def _try_tta(cfg: Config, configs: dict[str, Config], choice: CandidateChoice, out: Path, all_cases: list[Case],
             cases: list[Case], patients: list[str], progress: bool) -> CandidateChoice:
    """Predict the chosen candidates' out-of-fold cases (of ``all_cases``, the manifest) with
    mirroring into ``oof_tta/`` and apply :func:`choose_tta` on the scored ``cases``."""
    folds = read_folds(out / FOLDS_FILE)
    for name in choice.names:
        tcfg = configs[name].model_copy(deep=True)
        tcfg.inference.tta = True
        folder = candidate_dir(out, name)
        for k in range(folds.n_folds):
            predict_fold(tcfg, folder, folds, all_cases, k, progress=progress, oof_name=TTA_OOF_DIR)
    dirs = {n: candidate_dir(out, n) / OOF_DIR for n in choice.names}
    dirs.update({combination_name([n], True): candidate_dir(out, n) / TTA_OOF_DIR for n in choice.names})
    plain, mirrored = tuple(choice.names), tuple(combination_name([n], True) for n in choice.names)
    dice = score_combinations(cases, dirs, [plain, mirrored], cfg)
    return choose_tta(choice, dice[combination_name(plain)].to_numpy(), dice[combination_name(mirrored)].to_numpy(),
                      patients, cfg.cv.selection_min_gain)


def _write_averaged(cases: list[Case], sources: list[Path], target: Path) -> None:
    """The mean of ``sources``' probability maps of every case into ``target`` (float32, the
    maps' grid); one source is copied as it is."""
    from medseg.io import read_volume, write_volume

    target.mkdir(parents=True, exist_ok=True)
    for case in cases:
        paths = [prob_file(s, case.case_id) for s in sources]
        if len(paths) == 1:
            shutil.copyfile(paths[0], prob_file(target, case.case_id))
            continue
        volumes = [read_volume(p) for p in paths]
        mean = np.mean([v.array.astype(np.float32, copy=False) for v in volumes], axis=0)
        write_volume(mean, volumes[0], prob_file(target, case.case_id), dtype=np.float32)


def chosen_models(cv_dir: str | Path, n_folds: int, repeats: int) -> tuple[list[Path], list[str]]:
    """The model files a finished cv folder ships and their names in the model folder: the
    chosen candidates' fold models (``<name>_fold_<k>.pt``), or the run's own
    (``fold_<k>.pt``) without candidates."""
    choice = read_choice(cv_dir)
    if choice is None:
        models = fold_models(cv_dir, n_folds, repeats)
        return models, [f"{p.parent.name}.pt" for p in models]
    models, names = [], []
    for name in choice["chosen"]:
        paths = fold_models(candidate_dir(cv_dir, name), n_folds, repeats)
        models += paths
        names += [f"{name}_{p.parent.name}.pt" for p in paths]
    return models, names
