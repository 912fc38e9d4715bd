"""Read, validate and write ``data_manifest.csv``; patient-level splits.

Manifest format (CSV, one row per case; paths relative to the manifest's folder):

============  ===========================================================================
column        meaning
============  ===========================================================================
case_id       unique id; the only identifier that appears in outputs and reports
patient_id    groups cases of one patient (splits never separate a patient's cases)
modality      ``CT`` or ``MR``
image_<name>  one column per input channel, e.g. ``image_flair``, ``image_t1ce``; a file or
              a DICOM series folder. Every row fills the same channel columns.
label         lesion mask file (may be empty for inference-only rows)
split         ``train``, ``val``, ``test`` or empty (unassigned / inference)
============  ===========================================================================

Other columns are kept as they are and ignored.
"""

from __future__ import annotations

import csv
import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import ManifestError

REQUIRED_COLUMNS = ("case_id", "patient_id", "modality", "label", "split")
CHANNEL_PREFIX = "image_"
MODALITIES = ("CT", "MR")
SPLITS = ("train", "val", "test", "")


@dataclass
class Case:
    """One manifest row with absolute paths. ``images`` keeps the manifest's channel order."""

    case_id: str
    patient_id: str
    modality: str
    images: dict[str, Path]
    label: Path | None
    split: str
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def channels(self) -> list[str]:
        return list(self.images)


def channel_columns(header: Iterable[str]) -> list[str]:
    """The ``image_*`` columns, in file order."""
    return [c for c in header if c.startswith(CHANNEL_PREFIX) and len(c) > len(CHANNEL_PREFIX)]


def read_manifest(path: str | Path, check_files: bool = True) -> list[Case]:
    """Read and validate a manifest; raise ``ManifestError`` listing every problem.

    Each problem names the row (1-based, header = row 1), the case and the column. Checks:
    required columns, at least one ``image_*`` column, unique case ids, known modality and
    split, every channel column filled on every row, files exist (``check_files``).
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(p, ["manifest file not found"])
    with p.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    problems: list[str] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        problems.append(f"missing column(s) {missing}; required: {list(REQUIRED_COLUMNS)} plus image_<channel> columns")
    channels = channel_columns(header)
    if not channels:
        problems.append("no input channel column: add at least one column named image_<channel> (e.g. image_ct, image_flair)")
    if problems:
        raise ManifestError(p, problems)
    if not rows:
        raise ManifestError(p, ["manifest has a header but no rows"])

    base = p.parent
    seen: dict[str, int] = {}
    cases: list[Case] = []
    for i, row in enumerate(rows, start=2):
        case_id = row["case_id"]
        where = f"row {i} (case_id={case_id or '?'})"
        if not case_id:
            problems.append(f"row {i}: column case_id is empty")
        elif case_id in seen:
            problems.append(f"{where}: duplicate case_id (first on row {seen[case_id]})")
        else:
            seen[case_id] = i
        if not row["patient_id"]:
            problems.append(f"{where}: column patient_id is empty (use the case_id if each case is its own patient)")
        modality = row["modality"].upper()
        if modality not in MODALITIES:
            problems.append(f"{where}: column modality: unknown modality {row['modality']!r} (expected one of {list(MODALITIES)})")
        split = row["split"].lower()
        if split not in SPLITS:
            problems.append(f"{where}: column split: unknown split {row['split']!r} (expected train, val, test or empty)")
        images: dict[str, Path] = {}
        for col in channels:
            value = row.get(col, "")
            if not value:
                problems.append(f"{where}: column {col} is empty; every row must fill the same channel columns {channels}")
                continue
            file = (base / value).resolve() if not Path(value).is_absolute() else Path(value)
            if check_files and not file.exists():
                problems.append(f"{where}: column {col}: file not found: {file}")
            images[col[len(CHANNEL_PREFIX):]] = file
        label: Path | None = None
        if row["label"]:
            label = (base / row["label"]).resolve() if not Path(row["label"]).is_absolute() else Path(row["label"])
            if check_files and not label.exists():
                problems.append(f"{where}: column label: file not found: {label}")
        elif split in ("train", "val"):
            problems.append(f"{where}: column label is empty but split is {split!r} (training cases need a label)")
        extra = {k: v for k, v in row.items() if k not in REQUIRED_COLUMNS and k not in channels}
        cases.append(Case(case_id, row["patient_id"], modality, images, label, split, extra))
    if problems:
        raise ManifestError(p, problems)
    return cases


def write_manifest(cases: list[Case], path: str | Path) -> Path:
    """Write cases as a manifest with paths relative to its folder (atomic replace)."""
    out = Path(path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    channels: list[str] = []
    for case in cases:
        for name in case.images:
            if name not in channels:
                channels.append(name)
    extra_cols: list[str] = []
    for case in cases:
        for k in case.extra:
            if k not in extra_cols:
                extra_cols.append(k)
    header = ["case_id", "patient_id", "modality", *(CHANNEL_PREFIX + c for c in channels), "label", "split", *extra_cols]

    def rel(file: Path | None) -> str:
        if file is None:
            return ""
        try:
            return Path(file).resolve().relative_to(out.parent).as_posix()
        except ValueError:
            return Path(_relpath(Path(file).resolve(), out.parent)).as_posix()

    tmp = out.with_name(f".{out.name}.partial")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for c in cases:
            writer.writerow(
                [c.case_id, c.patient_id, c.modality, *(rel(c.images.get(ch)) for ch in channels), rel(c.label), c.split,
                 *(c.extra.get(k, "") for k in extra_cols)]
            )
    tmp.replace(out)
    return out


def _relpath(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target, start)


def assign_patient_splits(
    cases: list[Case], val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0
) -> list[Case]:
    """Assign ``split`` by patient (never by case or slice): a patient's cases share a split.

    Patients are shuffled deterministically (``seed``) and the first ``round(n*test_fraction)``
    go to test, the next ``round(n*val_fraction)`` (at least 1 when val_fraction > 0 and there
    are >= 2 patients) to val, the rest to train. Cases without a label get split ``""``.
    """
    patients = sorted({c.patient_id for c in cases if c.label is not None})
    rng = random.Random(seed)
    rng.shuffle(patients)
    n = len(patients)
    n_test = round(n * test_fraction)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    split_of = {pid: "test" for pid in patients[:n_test]}
    split_of.update({pid: "val" for pid in patients[n_test : n_test + n_val]})
    split_of.update({pid: "train" for pid in patients[n_test + n_val :]})
    for c in cases:
        c.split = split_of.get(c.patient_id, "") if c.label is not None else ""
    return cases


def pseudonymise(value: str, salt: str = "medseg") -> str:
    """Stable, non-reversible short id for a patient identifier (e.g. a DICOM PatientID)."""
    return "P" + hashlib.sha256(f"{salt}:{value}".encode()).hexdigest()[:12]
