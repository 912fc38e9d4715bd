"""Read, validate and write ``data_manifest.csv``; patient-level splits.

Manifest format (CSV, one row per case; paths relative to the manifest's folder):

============  ===========================================================================
column        meaning
============  ===========================================================================
case_id       unique id; the only identifier that appears in outputs and reports (it names
              output files: no ``/`` or ``\\``, no leading ``.``)
patient_id    groups cases of one patient (a patient's rows must share one split)
modality      ``CT`` or ``MR``
image_<name>  one column per input channel, e.g. ``image_flair``, ``image_t1ce``; a file or
              a DICOM series folder. Every row fills the same channel columns.
label         lesion mask file (may be empty for inference-only rows)
split         ``train``, ``val``, ``test`` or empty (unassigned / inference)
============  ===========================================================================

Other columns are kept as they are and ignored. Rows are numbered as CSV lines: the header is
row 1, the first case row 2 (every message naming a row uses this numbering).
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import ManifestError, is_utf8_text, printable_path
from medseg.text_input import NotTextError, read_user_text

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
    row: int | None = field(default=None, compare=False)  # CSV line of the manifest row (header = 1)

    @property
    def channels(self) -> list[str]:
        return list(self.images)

    @property
    def where(self) -> str:
        """``row N (case_id=X)`` for messages; ``case X`` when the case did not come from a manifest."""
        return f"row {self.row} (case_id={self.case_id})" if self.row is not None else f"case {self.case_id}"

    def missing_files(self, label: bool = True) -> list[str]:
        """One ``column <name>: file not found: <path>`` per missing image (and label) file."""
        files = [(CHANNEL_PREFIX + name, path) for name, path in self.images.items()]
        if label and self.label is not None:
            files.append(("label", self.label))
        return [f"column {col}: file not found: {path}" for col, path in files if not path.exists()]

    def check_files(self, label: bool = True) -> str | None:
        """Why this case cannot be read (``row N (case_id=X): column ...: file not found: ...``), or None."""
        missing = self.missing_files(label)
        return f"{self.where}: {'; '.join(missing)}" if missing else None


NAME_MAX = 255  # bytes in one file name (Linux, macOS; Windows: 255 UTF-16 units)


def case_id_problem(case_id: str, name_extra: int | None = None) -> str | None:
    """Why ``case_id`` cannot name output files (:mod:`medseg.outputs`), or None when it can.

    Refused: empty, a path separator (``/``, ``\\``), a leading ``.`` (hidden files, ``.``, ``..``).
    With ``name_extra`` (the bytes the caller's longest file name adds to the id: suffix and
    temporary-name parts, e.g. :data:`medseg.inference.case_files.CASE_NAME_EXTRA_BYTES`), also an
    id whose UTF-8 bytes plus ``name_extra`` exceed :data:`NAME_MAX`. The length is left to the
    commands that make the names (each fails that case alone), not to reading the manifest:
    ``stats`` makes no file from an id.
    """
    if not case_id:
        return "empty case id"
    if "/" in case_id or "\\" in case_id or case_id.startswith("."):
        return f"case id {case_id!r} cannot name a file (no '/', '\\' or leading '.')"
    if name_extra is not None:
        n_bytes = len(case_id.encode("utf-8", "surrogateescape"))
        if n_bytes + name_extra > NAME_MAX:
            shown = case_id if len(case_id) <= 40 else case_id[:40] + "..."
            return (f"case id {shown!r} is too long to name its files: {n_bytes} bytes (UTF-8), at most "
                    f"{NAME_MAX - name_extra} fit a file name ({NAME_MAX} bytes) with the suffixes medseg adds; "
                    "shorten the case_id")
    return None


def channel_columns(header: Iterable[str]) -> list[str]:
    """The ``image_*`` columns, in file order."""
    return [c for c in header if c.startswith(CHANNEL_PREFIX) and len(c) > len(CHANNEL_PREFIX)]


def read_manifest(path: str | Path, check_files: bool = True) -> list[Case]:
    """Read and validate a manifest; raise ``ManifestError`` listing every problem.

    Each problem names the row (the CSV line: header = row 1, first case = row 2), the case and
    the column. Checks: required columns, at least one ``image_*`` column, unique case ids that
    can name a file (:func:`case_id_problem`), known modality and split, a patient's rows all in
    one split (train / val / test; unassigned rows are free), every channel column filled on
    every row, files exist (``check_files``; without it, a batch command checks each case with
    :meth:`Case.check_files` and records a missing file as that case's failure).
    """
    p = Path(path)
    if not p.is_file():
        raise ManifestError(p, ["manifest file not found"])
    try:
        text = read_user_text(p)
    except NotTextError as exc:
        raise ManifestError(p, [str(exc)]) from None
    try:
        records = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise ManifestError(p, [f"not a readable CSV file: {exc}"]) from None
    numbered = [(i, r) for i, r in enumerate(records, start=1) if any(v.strip() for v in r)]  # blank lines are not rows
    if not numbered:
        raise ManifestError(p, ["empty file: expected a CSV header (case_id, patient_id, modality, image_<channel>, label, split)"])
    header = [h.strip() for h in numbered[0][1]]
    problems: list[str] = []
    doubled = sorted({h for h in header if header.count(h) > 1})
    if doubled:  # a CSV reader would silently keep the last of them
        raise ManifestError(p, [f"column(s) {doubled} appear more than once in the header; each column once"])
    rows: list[tuple[int, dict[str, str]]] = []
    for i, record in numbered[1:]:
        if len(record) != len(header):
            problems.append(f"row {i}: {len(record)} field(s) but the header has {len(header)} "
                            "(an unquoted comma in a value, or a missing field?)")  # fmt: skip
            continue
        rows.append((i, {k: v.strip() for k, v in zip(header, record, strict=True)}))
    if problems:
        raise ManifestError(p, problems)
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
    for i, row in rows:
        case_id = row["case_id"]
        where = f"row {i} (case_id={case_id or '?'})"
        if not case_id:
            problems.append(f"row {i}: column case_id is empty")
        elif (bad_id := case_id_problem(case_id)) is not None:
            problems.append(f"{where}: column case_id: {bad_id}")
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
            images[col[len(CHANNEL_PREFIX):]] = (base / value).resolve() if not Path(value).is_absolute() else Path(value)
        label: Path | None = None
        if row["label"]:
            label = (base / row["label"]).resolve() if not Path(row["label"]).is_absolute() else Path(row["label"])
        elif split in ("train", "val"):
            problems.append(f"{where}: column label is empty but split is {split!r} (training cases need a label)")
        extra = {k: v for k, v in row.items() if k not in REQUIRED_COLUMNS and k not in channels}
        case = Case(case_id, row["patient_id"], modality, images, label, split, extra, row=i)
        if check_files:
            problems += [f"{where}: {m}" for m in case.missing_files()]
        cases.append(case)
    problems += _split_problems(cases)
    problems += _shared_image_problems(cases)
    if problems:
        raise ManifestError(p, problems)
    return cases


def _shared_image_problems(cases: list[Case]) -> list[str]:
    """One problem per image file (or identical file content: size and the hash of its first
    64 KiB, :mod:`medseg.input_identity`, for the files that exist) that rows of different
    patients in different splits share: the same scan would be trained on and tested on as two
    patients. Rows without a split are not compared."""
    from medseg.input_identity import input_identity

    entries = [(c, path) for c in cases if c.split for path in c.images.values()]
    sizes: dict[Path, int] = {}
    for _, path in entries:
        try:
            if path.is_file():
                sizes[path] = path.stat().st_size
        except OSError:
            continue
    # only files whose size another patient's file in another split shares can be copies: only
    # those are hashed (a manifest of a thousand scans is not read 64 KiB by 64 KiB for nothing)
    holders: dict[int, set[tuple[str, str]]] = {}
    for c, path in entries:
        if path in sizes:
            holders.setdefault(sizes[path], set()).add((c.patient_id, c.split))
    owners: dict[object, dict[str, tuple[str, int]]] = {}
    for c, path in entries:
        keys: list[object] = [("path", str(path))]
        same_size = holders.get(sizes.get(path, -1), set())
        if len({pid for pid, _ in same_size}) > 1 and len({split for _, split in same_size}) > 1:
            identity = input_identity(path)
            if "head_sha256" in identity:
                keys.append(("content", identity["size"], identity["head_sha256"]))
        for key in keys:
            owners.setdefault(key, {}).setdefault(c.patient_id, (c.split, c.row or 0))
    problems, reported = [], set()
    for key, patients in sorted(owners.items(), key=lambda kv: kv[0][0] != "path"):  # the same file first
        if len(patients) < 2 or len({split for split, _ in patients.values()}) < 2:
            continue
        pair = frozenset(patients)
        if pair in reported:
            continue
        reported.add(pair)
        how = "the same image file" if key[0] == "path" else "identical image files (same size and content start)"
        listing = ", ".join(f"{pid!r} ({split}, row {row})" for pid, (split, row) in patients.items())
        problems.append(f"{how} under patient_ids {listing}: one scan in two splits leaks the test patients into "
                        "training; give the scan one patient_id, or remove the copy")
    return problems


def _split_problems(cases: list[Case]) -> list[str]:
    """One problem per patient whose rows lie in more than one of train / val / test."""
    rows: dict[str, dict[str, list[int]]] = {}
    for c in cases:
        if c.split and c.patient_id:
            rows.setdefault(c.patient_id, {}).setdefault(c.split, []).append(c.row or 0)
    problems = []
    for patient, by_split in rows.items():
        if len(by_split) > 1:
            listing = ", ".join(f"{s} (row{'s' if len(r) > 1 else ''} {', '.join(map(str, r))})" for s, r in by_split.items())
            problems.append(
                f"patient_id {patient!r} is in more than one split: {listing}; splits must be patient-level "
                "(a patient's cases in one split; medseg.manifest.assign_patient_splits)"
            )
    return problems


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

    rows = [[c.case_id, c.patient_id, c.modality, *(rel(c.images.get(ch)) for ch in channels), rel(c.label), c.split,
             *(c.extra.get(k, "") for k in extra_cols)] for c in cases]  # fmt: skip
    not_utf8 = list(dict.fromkeys(printable_path(v) for row in rows for v in row if not is_utf8_text(v)))
    if not_utf8:  # a UTF-8 manifest cannot name them; nothing is written
        raise ManifestError(out, [f"{len(not_utf8)} name(s) are not valid UTF-8 text and cannot be written to the "
                                  f"manifest: {', '.join(not_utf8[:3])}; rename the files (UTF-8 names)"])  # fmt: skip
    from medseg.atomic import atomic_path

    with atomic_path(out) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
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
