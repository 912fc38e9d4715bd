"""DICOM image series under a folder -> manifest rows (``medseg import dicom``).

Contract of the rows (what :func:`medseg.importers.import_dicom` builds on):

- **Series**: every file under the root whose header (read by pydicom, no pixel data) has a
  SeriesInstanceUID and a SOPInstanceUID belongs to the series of that UID, wherever its folder
  is: one series is never split across rows, two series are never merged into one. A file seen
  twice (the same SOPInstanceUID) counts once.
- **Rows**: one per series (default), or one per study with one channel per ``--series
  NAME=REGEX`` rule (:func:`plan_study_rows`). Only CT and MR series with more than one instance
  are volumes; other modalities and single-instance series (localisers) are skipped with one
  log line each. Problems of one series or study are :class:`Refusal` records (one line that says
  the fix); the others go on.
- **Ids**: patient id = keyed pseudonym of PatientID (:mod:`medseg.pseudonyms`); case id = the
  pseudonym + ``_s<n>`` (the patient's n-th volume series) or ``_st<n>`` (the patient's n-th
  study, ``--series`` rows), numbered in (StudyDate, StudyTime, StudyInstanceUID, SeriesNumber,
  SeriesInstanceUID) order -- never folder names or DICOM text. An empty PatientID is refused
  unless ``allow_missing_patient_id`` (then the StudyInstanceUID is keyed instead).
- **Series folders**: a manifest image path is a folder read as "the DICOM series in this
  folder", so each row gets ``<series_dir>/<case_id>/`` (one channel) or
  ``<series_dir>/<case_id>/<channel>/`` (several) holding symbolic links ``0000.dcm``,
  ``0001.dcm``... to exactly that series' instance files (:func:`write_series_folders`). The
  links point at the archive: keep it where it is, or import again after moving it.

Nothing here logs or returns a PatientID, PatientName or folder name; source folders go only to
the ``--map-file`` records (:func:`map_records`, written owner-only), which the user keeps where
identifiers may be kept. The manifest and the series folder names carry pseudonyms only; the
links' targets name the source files, like the map file (docs/dicom.md).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import OutputError, printable_path
from medseg.manifest import Case
from medseg.pseudonyms import pseudonym

log = logging.getLogger(__name__)

SERIES_FOLDER = "dicom_series"  # default series folder, beside the manifest
VOLUME_MODALITIES = ("CT", "MR")
LABEL_MODALITIES = ("SEG", "RTSTRUCT")
MISSING_PATIENT_ID = "PatientID is empty; give --allow-missing-patient-id to key it on the StudyInstanceUID"
_HEADER_TAGS = ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Modality", "SeriesNumber",
                "SeriesDescription", "ProtocolName", "StudyDate", "StudyTime", "InstanceNumber",
                "ImagePositionPatient", "ImageOrientationPatient", "NumberOfFrames"]  # fmt: skip


@dataclass
class Series:
    """One DICOM series found under the root. ``patient_ids`` are the raw DICOM values: they are
    only ever keyed (:func:`medseg.pseudonyms.pseudonym`), never printed."""

    uid: str
    study_uid: str
    modality: str
    number: int | None
    description: str  # SeriesDescription
    protocol: str  # ProtocolName
    study_order: tuple[str, str]  # (StudyDate, StudyTime)
    patient_ids: set[str] = field(default_factory=set)
    instances: dict[str, tuple[int, Path]] = field(default_factory=dict)  # SOPInstanceUID -> (InstanceNumber, file)
    folders: list[str] = field(default_factory=list)  # relative to the root; for the map file only
    duplicates: int = 0
    headers: list[tuple[Path, object]] = field(default_factory=list, repr=False)  # (file, header) per instance

    def geometry_problem(self) -> str | None:
        """Why the series' slices do not form a regular grid (a gap, duplicated or scattered
        positions, no Image Position/Orientation: :func:`medseg.io.dicom_slice_spacing`), or None.
        Multi-frame instances are left to the reader."""
        from medseg.errors import InputFileError
        from medseg.io import dicom_slice_spacing

        if len(self.headers) < 2 or any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for _, ds in self.headers):
            return None
        try:
            dicom_slice_spacing(self.headers, Path(self.folders[0]) if self.folders else Path("."))
        except InputFileError as exc:
            return exc.problem
        return None

    @property
    def files(self) -> list[Path]:
        """Instance files in (InstanceNumber, path) order (readers place slices by position anyway)."""
        return [path for _, path in sorted(self.instances.values())]

    @property
    def number_text(self) -> str:
        return str(self.number) if self.number is not None else "(no number)"

    @property
    def order(self) -> tuple:
        return (*self.study_order, self.study_uid, self.number if self.number is not None else 1 << 31, self.uid)

    def summary(self) -> str:
        """``3 MR "T1 SE" 24 instances`` (series number, modality, description, instance count)."""
        text = self.description or self.protocol
        return f'{self.number_text} {self.modality or "?"} "{text}" {len(self.instances)} instance(s)'


@dataclass(frozen=True)
class Refusal:
    """A series or study that did not become a row: ``what`` names it by pseudonymous ids and
    series numbers only, ``error`` says why and what to do."""

    what: str
    error: str
    series: tuple[Series, ...] = ()


@dataclass
class Row:
    """One manifest row to be: channel name -> its series (manifest channel order)."""

    case_id: str
    patient_id: str
    modality: str
    series: dict[str, Series]


@dataclass(frozen=True)
class SeriesRule:
    """``--series NAME=REGEX``: channel ``name`` is the study's one series whose SeriesDescription
    or ProtocolName matches ``pattern`` (``re.search``, case-insensitive)."""

    name: str
    pattern: re.Pattern[str]

    def matches(self, series: Series) -> bool:
        return any(self.pattern.search(text) for text in (series.description, series.protocol) if text)


# ----------------------------------------------------------------------------- finding series


def find_series(root: Path, exclude: Path | None = None) -> list[Series]:
    """Every DICOM series under ``root`` (files grouped by SeriesInstanceUID across folders).

    ``exclude``: a folder not to look into (the series folders of an earlier import, whose links
    would otherwise be read as copies). Files that are not DICOM are skipped."""
    skip = exclude.resolve() if exclude is not None else None
    found: dict[str, Series] = {}
    seen: set[Path] = set()
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if skip is None or (here / d).resolve() != skip)
        for name in sorted(names):
            path = here / name
            try:
                real = path.resolve()
            except OSError:
                continue
            if real in seen or not real.is_file():
                continue
            seen.add(real)
            ds = _read_header(path)
            if ds is None:
                continue
            _add_instance(found, ds, path, here, root)
    for series in found.values():
        if series.duplicates:
            log.info("series %s: %d file(s) repeat an instance (same SOPInstanceUID); each instance counted once",
                     series.number_text, series.duplicates)  # fmt: skip
    return sorted(found.values(), key=lambda s: s.order)


def _text(ds: object, keyword: str) -> str:
    value = getattr(ds, keyword, None)
    return "" if value is None else str(value).strip()


def _read_header(path: Path) -> object | None:
    """The header tags medseg needs, or None for a file that is not a DICOM instance."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except InvalidDicomError:
        # a file without the 128-byte preamble (GDCM reads those): starts with a group 0002/0008 tag
        try:
            with path.open("rb") as fh:
                start = fh.read(2)
            if start not in (b"\x02\x00", b"\x08\x00"):
                return None
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS, force=True)
        except Exception:  # pydicom raises several types for files that only look like DICOM
            return None
    except Exception:
        return None
    if not _text(ds, "SeriesInstanceUID") or not _text(ds, "SOPInstanceUID"):
        return None
    return ds


def _add_instance(found: dict[str, Series], ds: object, path: Path, folder: Path, root: Path) -> None:
    uid = _text(ds, "SeriesInstanceUID")
    series = found.get(uid)
    if series is None:
        try:
            number: int | None = int(float(_text(ds, "SeriesNumber")))
        except ValueError:
            number = None
        series = found[uid] = Series(uid, _text(ds, "StudyInstanceUID"), _text(ds, "Modality").upper(), number,
                                     _text(ds, "SeriesDescription"), _text(ds, "ProtocolName"),
                                     (_text(ds, "StudyDate"), _text(ds, "StudyTime")))  # fmt: skip
    series.patient_ids.add(_text(ds, "PatientID"))
    sop = _text(ds, "SOPInstanceUID")
    if sop in series.instances:
        series.duplicates += 1
        return
    try:
        instance_number = int(float(_text(ds, "InstanceNumber")))
    except ValueError:
        instance_number = 0
    series.instances[sop] = (instance_number, path)
    series.headers.append((Path(path.name), ds))  # file names only: messages never name source folders
    rel = folder.relative_to(root).as_posix() if folder != root else "."
    if rel not in series.folders:
        series.folders.append(rel)


# ----------------------------------------------------------------------------- rows


class _Keys:
    """Pseudonyms of one import (one site secret) and the per-patient numbering of rows."""

    def __init__(self, secret: bytes, allow_missing_patient_id: bool) -> None:
        self.secret = secret
        self.allow_missing = allow_missing_patient_id
        self.counts: dict[str, int] = defaultdict(int)

    def patient(self, patient_ids: set[str], study_uid: str) -> str | None:
        """The patient pseudonym; None when the PatientID is empty and no fallback is allowed.
        Raises ``ValueError`` when the instances carry several PatientIDs."""
        ids = {p for p in patient_ids if p}
        if len(ids) > 1:
            raise ValueError(f"its instances carry {len(ids)} different PatientIDs (files of different patients share "
                             "one UID); remove the files that do not belong to it and import again")  # fmt: skip
        if ids:
            return pseudonym(ids.pop(), self.secret)
        return pseudonym(study_uid, self.secret) if self.allow_missing and study_uid else None

    def study(self, study_uid: str) -> str:
        return pseudonym(study_uid or "(no StudyInstanceUID)", self.secret)

    def next_case_id(self, patient: str, kind: str) -> str:
        self.counts[patient] += 1
        return f"{patient}_{kind}{self.counts[patient]}"


def _skip_reason(series: Series, skip_labels: bool) -> str | None:
    if series.modality not in VOLUME_MODALITIES:
        if skip_labels and series.modality in LABEL_MODALITIES:
            return ""  # the label objects are paired with their series afterwards: no line
        return f"modality {series.modality or '(none)'} is not CT or MR"
    if len(series.instances) < 2:
        return f"{len(series.instances)} instance, not a volume"
    return None


def plan_series_rows(
    all_series: list[Series], secret: bytes, channel: str, modality: str | None = None, modality_source: str = "",
    allow_missing_patient_id: bool = False, skip_labels: bool = False,
) -> tuple[list[Row], list[Refusal]]:  # fmt: skip
    """One row per CT/MR volume series, channel ``channel``; ``modality``: only series of it
    (``modality_source`` names who wants it in the skip line, e.g. ``the model takes CT``)."""
    keys = _Keys(secret, allow_missing_patient_id)
    rows: list[Row] = []
    refusals: list[Refusal] = []
    for series in all_series:  # sorted by study and series number: the per-patient numbering order
        try:
            patient = keys.patient(series.patient_ids, series.study_uid)
        except ValueError as exc:
            refusals.append(Refusal(f"study {keys.study(series.study_uid)} series {series.number_text}", str(exc), (series,)))
            continue
        name = f"patient {patient} series {series.number_text}" if patient else \
            f"study {keys.study(series.study_uid)} series {series.number_text}"  # fmt: skip
        reason = _skip_reason(series, skip_labels)
        if reason is not None:
            if reason:
                log.info("skipped %s: %s", name, reason)
            continue
        if patient is None:
            refusals.append(Refusal(name, MISSING_PATIENT_ID, (series,)))
            continue
        case_id = keys.next_case_id(patient, "s")
        if modality and series.modality != modality:
            log.info("skipped %s (%s): modality %s, %s", case_id, name, series.modality, modality_source)
            continue
        problem = series.geometry_problem()
        if problem is not None:
            refusals.append(Refusal(case_id, f"{name}: {problem}; re-export the complete series", (series,)))
            continue
        rows.append(Row(case_id, patient, series.modality, {channel: series}))
    return rows, refusals


def plan_study_rows(
    all_series: list[Series], secret: bytes, rules: list[SeriesRule], modality: str | None = None,
    modality_source: str = "", allow_missing_patient_id: bool = False,
) -> tuple[list[Row], list[Refusal]]:  # fmt: skip
    """One row per study, channel ``rule.name`` = the study's one volume series (CT/MR, more than
    one instance, of ``modality`` when given) that ``rule`` matches. A study where a rule matches
    no series or several, or where one series would fill two channels, is refused naming the
    study by its case id and listing its series."""
    keys = _Keys(secret, allow_missing_patient_id)
    studies: dict[str, list[Series]] = defaultdict(list)
    for series in all_series:
        studies[series.study_uid].append(series)
    rows: list[Row] = []
    refusals: list[Refusal] = []
    for study_uid, members in sorted(studies.items(), key=lambda kv: (kv[1][0].study_order, kv[0])):
        volumes = [s for s in members if _skip_reason(s, False) is None]
        listing = "; ".join(s.summary() for s in members)
        try:
            patient = keys.patient(set().union(*(s.patient_ids for s in members)), study_uid)
        except ValueError as exc:
            refusals.append(Refusal(f"study {keys.study(study_uid)}", f"{exc} (series: {listing})", tuple(members)))
            continue
        if not volumes:
            log.info("skipped study %s: no CT/MR series with more than one instance (series: %d)",
                     keys.study(study_uid), len(members))  # fmt: skip
            continue
        if patient is None:
            refusals.append(Refusal(f"study {keys.study(study_uid)}", MISSING_PATIENT_ID, tuple(members)))
            continue
        case_id = keys.next_case_id(patient, "st")
        wanted = [s for s in volumes if not modality or s.modality == modality]
        if not wanted:
            found = "/".join(sorted({s.modality for s in volumes}))
            log.info("skipped study %s: modality %s, %s", case_id, found, modality_source)
            continue
        chosen: dict[str, Series] = {}
        problems = []
        for rule in rules:
            matches = [s for s in wanted if rule.matches(s)]
            if len(matches) == 1:
                chosen[rule.name] = matches[0]
            else:
                numbers = ", ".join(s.number_text for s in matches)
                problems.append(f"channel {rule.name}: " + (f"no series matches {rule.pattern.pattern!r}" if not matches
                                else f"{len(matches)} series ({numbers}) match {rule.pattern.pattern!r}"))  # fmt: skip
        uses: dict[str, list[str]] = defaultdict(list)
        for name, series in chosen.items():
            uses[series.uid].append(name)
        problems += [f"series {chosen[names[0]].number_text} matches channels {' and '.join(names)}"
                     for names in uses.values() if len(names) > 1]  # fmt: skip
        problems += [f"channel {name} (series {series.number_text}): {problem}" for name, series in chosen.items()
                     if (problem := series.geometry_problem()) is not None]
        modalities = sorted({s.modality for s in chosen.values()})
        if not problems and len(modalities) > 1:
            problems.append(f"the channels mix {' and '.join(modalities)}; give --modality CT or MR")
        if problems:
            refusals.append(Refusal(case_id, f"{'; '.join(problems)} -- the study's series: {listing}; make each "
                                             "--series REGEX match exactly one of these (SeriesDescription or "
                                             "ProtocolName, case-insensitive)", tuple(members)))  # fmt: skip
            continue
        rows.append(Row(case_id, patient, modalities[0], {rule.name: chosen[rule.name] for rule in rules}))
    return rows, refusals


# ----------------------------------------------------------------------------- series folders


def series_folder(series_dir: Path, case_id: str, channel: str, n_channels: int) -> Path:
    """``<series_dir>/<case_id>`` for a one-channel row, ``<series_dir>/<case_id>/<channel>`` else."""
    return series_dir / case_id if n_channels == 1 else series_dir / case_id / channel


def write_series_folders(rows: list[Row], series_dir: Path) -> list[Case]:
    """Fill each row's series folders with links to its instance files (module docstring) and
    return the rows as cases whose images are those folders. An existing case folder is
    replaced when it holds only links (an earlier import), else refused naming it."""
    cases = []
    for row in rows:
        target = series_dir / row.case_id
        _check_replaceable(target)
        staging = series_dir / f".{row.case_id}.partial-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        images = {}
        for channel, series in row.series.items():
            _link_instances(series.files, staging / channel if len(row.series) > 1 else staging)
            images[channel] = series_folder(series_dir, row.case_id, channel, len(row.series)).resolve()
        if target.exists():
            shutil.rmtree(target)  # links only (checked above): the archive's files are not touched
        staging.rename(target)
        cases.append(Case(row.case_id, row.patient_id, row.modality, images, None, ""))
    return cases


def remove_series_folder(series_dir: Path, case_id: str) -> None:
    """Remove the series folder of a row refused after its folder was written (a bad label
    object): it holds only links (checked), the archive's files are not touched."""
    target = series_dir / case_id
    if target.exists() and not target.is_symlink():
        _check_replaceable(target)
        shutil.rmtree(target)


def _link_instances(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True)
    width = max(4, len(str(len(files) - 1)))
    for index, file in enumerate(files):
        # bytes on both sides: a source name that is not UTF-8 is linked as it is
        os.symlink(os.fsencode(file.resolve()), os.fsencode(folder / f"{index:0{width}d}.dcm"))


def _check_replaceable(target: Path) -> None:
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink() or not target.is_dir():
        raise OutputError(target, "exists and is not a series folder of medseg import dicom; move it or choose "
                                  "another --series-dir")  # fmt: skip
    for entry in target.rglob("*"):
        if not entry.is_symlink() and not entry.is_dir():
            raise OutputError(target, f"holds {printable_path(entry.name)}, which medseg import dicom did not write "
                                      "(a series folder holds only links); move it or choose another --series-dir")  # fmt: skip


def map_records(rows: list[Row], refusals: list[Refusal]) -> list[dict[str, str]]:
    """``--map-file`` rows: source folder(s), SeriesInstanceUID, case id (or the refusal's name),
    channel, status (``row`` or ``refused``). The only link back to the folders."""
    records = []
    for row in rows:
        for channel, series in row.series.items():
            records.append({"folder": ";".join(map(printable_path, series.folders)), "series_uid": series.uid,
                            "case_id": row.case_id, "channel": channel, "status": "row"})  # fmt: skip
    for refusal in refusals:
        for series in refusal.series:
            records.append({"folder": ";".join(map(printable_path, series.folders)), "series_uid": series.uid,
                            "case_id": refusal.what, "channel": "", "status": "refused"})  # fmt: skip
    return records
