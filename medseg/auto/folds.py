"""Patient-level k-fold assignment for cross-validation, stored in the run folder.

The **pool** is every labelled manifest row whose split is not ``test`` (``train``, ``val`` or
empty): cross-validation replaces the single train/val split, and the test rows stay untouched.
Its distinct patients are sorted, shuffled with ``random.Random(seed)`` and dealt round-robin
into ``n_folds`` folds, so fold sizes differ by at most one patient, a patient's cases are
always in one fold, and the same pool, fold count and seed give the same folds on every
machine. Fold k's models train on every other fold and predict fold k (out-of-fold).

``folds.json`` records the assignment (fold -> patients and case ids) so that a resumed or
repeated run uses exactly the same folds; :func:`load_or_create_folds` refuses a stored
assignment that no longer matches the manifest's pool instead of silently re-dealing it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.atomic import write_json
from medseg.errors import ConfigError, ManifestError
from medseg.manifest import Case

FOLDS_FILE = "folds.json"


def cv_pool(cases: Sequence[Case]) -> list[Case]:
    """The cases cross-validation uses: labelled rows whose split is not ``test``."""
    return [c for c in cases if c.label is not None and c.split != "test"]


@dataclass(frozen=True)
class FoldAssignment:
    """``patients[k]``: the patient ids held out in fold k (sorted); ``seed`` and the pool's case
    ids, to recognise a stored assignment that no longer fits the manifest."""

    n_folds: int
    seed: int
    patients: tuple[tuple[str, ...], ...]
    case_ids: tuple[str, ...]

    def fold_of_patient(self) -> dict[str, int]:
        return {pid: k for k, group in enumerate(self.patients) for pid in group}

    def split(self, cases: Sequence[Case], fold: int) -> tuple[list[Case], list[Case]]:
        """(train, held-out) pool cases of ``fold``: held-out = the fold's patients."""
        if not 0 <= fold < self.n_folds:
            raise ConfigError(f"fold {fold} does not exist: folds are 0..{self.n_folds - 1}")
        held = set(self.patients[fold])
        pool = cv_pool(cases)
        return [c for c in pool if c.patient_id not in held], [c for c in pool if c.patient_id in held]

    def as_dict(self, cases: Sequence[Case] = ()) -> dict:
        by_patient: dict[str, list[str]] = {}
        for c in cv_pool(cases):
            by_patient.setdefault(c.patient_id, []).append(c.case_id)
        return {
            "n_folds": self.n_folds,
            "seed": self.seed,
            "pool_case_ids": list(self.case_ids),
            "folds": [
                {"fold": k, "patients": list(group),
                 "case_ids": sorted(cid for pid in group for cid in by_patient.get(pid, []))}
                for k, group in enumerate(self.patients)
            ],
        }


def assign_folds(cases: Sequence[Case], n_folds: int, seed: int = 0, manifest: str | Path = "manifest") -> FoldAssignment:
    """Deal the pool's patients into ``n_folds`` folds (module docstring). Raises
    ``ManifestError`` when the pool has fewer patients than folds."""
    pool = cv_pool(cases)
    patients = sorted({c.patient_id for c in pool})
    if len(patients) < n_folds:
        raise ManifestError(
            Path(manifest),
            [f"{n_folds}-fold cross-validation needs at least {n_folds} patients with a label outside the test "
             f"split; the manifest has {len(patients)} (set cv.folds lower)"],
        )
    random.Random(seed).shuffle(patients)
    groups = [sorted(patients[k::n_folds]) for k in range(n_folds)]
    return FoldAssignment(n_folds, seed, tuple(tuple(g) for g in groups), tuple(sorted(c.case_id for c in pool)))


def read_folds(path: str | Path) -> FoldAssignment:
    """Read ``folds.json`` (``ConfigError`` naming the file when it is broken)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return FoldAssignment(
            int(data["n_folds"]), int(data["seed"]),
            tuple(tuple(str(p) for p in f["patients"]) for f in data["folds"]),
            tuple(str(c) for c in data["pool_case_ids"]),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable fold assignment ({type(exc).__name__}: {exc})") from None


def load_or_create_folds(
    folder: str | Path, cases: Sequence[Case], n_folds: int, seed: int, manifest: str | Path = "manifest"
) -> FoldAssignment:
    """The assignment stored in ``folder/folds.json``, or a new one written there.

    A stored assignment must match the requested fold count and seed and the manifest's pool
    (same case ids); otherwise ``ConfigError`` (a run's folds never change under it: start a
    new run folder for a new pool).
    """
    path = Path(folder) / FOLDS_FILE
    fresh = assign_folds(cases, n_folds, seed, manifest)
    if path.is_file():
        stored = read_folds(path)
        if (stored.n_folds, stored.seed, stored.case_ids) != (fresh.n_folds, fresh.seed, fresh.case_ids):
            raise ConfigError(
                f"{path}: stored folds ({stored.n_folds} folds, seed {stored.seed}, {len(stored.case_ids)} pool cases) "
                f"do not match this run ({n_folds} folds, seed {seed}, {len(fresh.case_ids)} pool cases from {manifest}); "
                "use a new output folder"
            )
        return stored
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json(path, fresh.as_dict(cases))
    return fresh
