"""Build manifests from common dataset layouts.

- ``import_brats(root)``: folders (or one flat folder) of ``<case>_<channel>.nii.gz`` plus
  ``<case>_seg.nii.gz`` (BraTS 2018-2021; BraTS 2023's ``<case>-<channel>`` naming too).
- ``import_nnunet(root)``: nnU-Net v2 raw layout (``dataset.json`` with ``channel_names``,
  ``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz``, optional ``imagesTs``) and
  MSD-style ``dataset.json`` (``modality`` + ``training`` list) with 3-D images.
- ``import_files(images_glob, labels_glob)``: image/label pairs matched by file stem.
- ``import_dicom(root, series_dir=...)``: one case per DICOM series (or per study with
  ``--series`` rules), each pointing at a folder of links holding exactly that series; the
  patient id is a keyed pseudonym of the DICOM PatientID, so no identifier enters the manifest
  (:mod:`medseg.dicom.import_series`).

All return ``list[Case]`` (``import_dicom``: a :class:`DicomImport` with the cases and the
refused series); ``write_manifest`` stores them with relative paths.
"""

from __future__ import annotations

import glob
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.dicom.import_series import Refusal, Row, SeriesRule
from medseg.errors import InputFileError, MedsegError, printable_path
from medseg.manifest import Case
from medseg.text_input import read_user_json

NIFTI_RE = re.compile(r"^(?P<stem>.+?)(?P<ext>\.nii\.gz|\.nii|\.nrrd|\.mha)$", re.IGNORECASE)
LABEL_CHANNELS = ("seg", "label", "labels", "mask", "gt")
LABEL_SUFFIXES = ("_seg", "-seg", "_label", "_labels", "_mask", "-mask", "_gt", "_roi", "-label")
IMAGE_SUFFIXES = ("_0000", "_img", "_image", "-image", "_ct", "_mr")


def channel_name(text: str) -> str:
    """Manifest-safe channel name: lower case, letters/digits/underscores."""
    name = re.sub(r"[^0-9a-zA-Z]+", "_", text.strip()).strip("_").lower()
    return name or "image"


def _split_case_channel(stem: str) -> tuple[str, str] | None:
    cut = max(stem.rfind("_"), stem.rfind("-"))
    if cut <= 0 or cut == len(stem) - 1:
        return None
    return stem[:cut], stem[cut + 1 :].lower()


def import_brats(root: str | Path, modality: str = "MR") -> list[Case]:
    """One case per ``<case>_<channel>`` group; ``seg``/``label``/``mask`` is the label."""
    base = Path(root)
    if not base.is_dir():
        raise MedsegError(f"{base}: folder not found")
    groups: dict[tuple[Path, str], dict[str, Path]] = defaultdict(dict)
    for file in sorted(base.rglob("*")):
        m = NIFTI_RE.match(file.name)
        if not file.is_file() or not m:
            continue
        parts = _split_case_channel(m.group("stem"))
        if parts is None:
            continue
        case_id, channel = parts
        groups[(file.parent, case_id)][channel] = file
    if not groups:
        raise MedsegError(f"{base}: no <case>_<channel>.nii.gz files found")
    cases: list[Case] = []
    channel_sets: dict[frozenset[str], list[str]] = defaultdict(list)
    seen: dict[str, Path] = {}
    for (folder, case_id), files in sorted(groups.items(), key=lambda kv: kv[0][1]):
        label = next((files[c] for c in LABEL_CHANNELS if c in files), None)
        images = {channel_name(c): f for c, f in sorted(files.items()) if c not in LABEL_CHANNELS}
        if not images:
            continue
        if case_id in seen:
            raise MedsegError(f"case id {case_id!r} appears in two folders: {seen[case_id]} and {folder}")
        seen[case_id] = folder
        channel_sets[frozenset(images)].append(case_id)
        cases.append(Case(case_id, case_id, modality, images, label, "train" if label else ""))
    if len(channel_sets) > 1:
        detail = "; ".join(f"{sorted(k)}: {v[:3]}{'...' if len(v) > 3 else ''}" for k, v in channel_sets.items())
        raise MedsegError(f"{base}: cases have different channel sets ({detail}); every case needs the same channels")
    return cases


def import_nnunet(root: str | Path, modality: str | None = None) -> list[Case]:
    """nnU-Net v2 raw dataset (or MSD ``dataset.json`` with 3-D images)."""
    base = Path(root)
    spec_path = base / "dataset.json"
    spec = read_user_json(spec_path, MedsegError, missing=f"dataset.json not found (is {base} an nnU-Net raw dataset folder?)")
    names = spec.get("channel_names") or spec.get("modality")
    if not isinstance(names, dict) or not names:
        raise MedsegError(f"{spec_path}: needs 'channel_names' (nnU-Net v2) or 'modality' (MSD)")
    order = sorted(names, key=int)
    channels = [channel_name(str(names[k])) for k in order]
    if len(set(channels)) != len(channels):
        channels = [f"{c}_{k}" for c, k in zip(channels, order, strict=True)]
    mod = modality or ("CT" if any(str(names[k]).strip().upper() == "CT" for k in order) else "MR")
    cases: list[Case] = []
    if "training" in spec and isinstance(spec["training"], list) and "channel_names" not in spec:
        # MSD v1: each entry names one (possibly 4-D) image; only single-channel 3-D data maps to columns
        if len(channels) > 1:
            raise MedsegError(
                f"{spec_path}: MSD dataset with {len(channels)} modalities stored as 4-D images; convert it with "
                "nnUNetv2_convert_MSD_dataset (one file per channel) and import the converted folder"
            )
        for entry in spec["training"]:
            img, lab = base / entry["image"], base / entry["label"]
            cid = NIFTI_RE.match(img.name).group("stem") if NIFTI_RE.match(img.name) else img.stem
            cases.append(Case(cid, cid, mod, {channels[0]: img.resolve()}, lab.resolve(), "train"))
        for entry in spec.get("test", []):
            img = base / (entry if isinstance(entry, str) else entry["image"])
            cid = NIFTI_RE.match(img.name).group("stem") if NIFTI_RE.match(img.name) else img.stem
            cases.append(Case(cid, cid, mod, {channels[0]: img.resolve()}, None, ""))
        return cases
    ending = spec.get("file_ending", ".nii.gz")
    for folder, has_labels in (("imagesTr", True), ("imagesTs", False)):
        img_dir = base / folder
        if not img_dir.is_dir():
            if has_labels:
                raise MedsegError(f"{img_dir}: folder not found")
            continue
        suffix0 = f"_0000{ending}"
        for first in sorted(img_dir.glob(f"*{suffix0}")):
            cid = first.name[: -len(suffix0)]
            images = {}
            for idx, ch in zip(order, channels, strict=True):
                f = img_dir / f"{cid}_{int(idx):04d}{ending}"
                if not f.exists():
                    raise MedsegError(f"{f}: channel {idx} ({ch}) of case {cid} is missing")
                images[ch] = f.resolve()
            label = (base / "labelsTr" / f"{cid}{ending}") if has_labels else None
            if label is not None and not label.exists():
                raise MedsegError(f"{label}: label of training case {cid} is missing")
            cases.append(Case(cid, cid, mod, images, label.resolve() if label else None, "train" if label else ""))
    if not cases:
        raise MedsegError(f"{base}: no images named <case>_0000{ending} in imagesTr/")
    return cases


def _stem(path: Path) -> str:
    m = NIFTI_RE.match(path.name)
    return m.group("stem") if m else path.stem


def _strip_suffix(stem: str, suffixes: tuple[str, ...]) -> str:
    low = stem.lower()
    for s in suffixes:
        if low.endswith(s):
            return stem[: -len(s)]
    return stem


def import_files(
    images_glob: str, labels_glob: str | None = None, modality: str = "MR", channel: str = "image"
) -> list[Case]:
    """Pair images and labels by stem (``_seg``, ``_label``, ``_mask``, ``_0000``… suffixes removed).

    Images without a label become inference rows; a label without an image is an error.
    """
    images = sorted(Path(p) for p in glob.glob(images_glob, recursive=True))
    if not images:
        raise MedsegError(f"no image files match {images_glob!r}")
    by_id: dict[str, Path] = {}
    for img in images:
        cid = _strip_suffix(_stem(img), IMAGE_SUFFIXES)
        if cid in by_id:
            raise MedsegError(f"two images map to case id {cid!r}: {by_id[cid]} and {img}")
        by_id[cid] = img
    labels: dict[str, Path] = {}
    if labels_glob:
        for lab in sorted(Path(p) for p in glob.glob(labels_glob, recursive=True)):
            cid = _strip_suffix(_stem(lab), LABEL_SUFFIXES)
            if cid not in by_id:
                raise MedsegError(f"{lab}: label has no matching image (expected an image with stem {cid!r})")
            labels[cid] = lab
    ch = channel_name(channel)
    return [
        Case(cid, cid, modality, {ch: img.resolve()}, labels[cid].resolve() if cid in labels else None,
             "train" if cid in labels else "")
        for cid, img in by_id.items()
    ]


@dataclass
class DicomImport:
    """What :func:`import_dicom` made: the rows (``cases``, images = series folders of links) and
    the series / studies it refused (:class:`medseg.dicom.import_series.Refusal`, one line each)."""

    cases: list[Case]
    refusals: list[Refusal]

    def failure_rows(self) -> list[dict[str, str]]:
        """``what, error`` records for ``<manifest stem>_failures.csv`` (pseudonymous names only)."""
        return [{"what": r.what, "error": r.error} for r in self.refusals]


def import_dicom(
    root: str | Path,
    map_file: str | Path | None = None,
    labels: str | None = None,
    label_dir: str | Path | None = None,
    select: str | None = None,
    *,
    series_dir: str | Path | None = None,
    channel: str | None = None,
    model: str | Path | None = None,
    series: Sequence[str] = (),
    modality: str | None = None,
    allow_missing_patient_id: bool = False,
) -> DicomImport:
    """Manifest rows from the DICOM series under ``root`` (:mod:`medseg.dicom.import_series`).

    One row per CT/MR series by default, channel ``channel`` (default ``image``); each row's
    image is ``series_dir/<case_id>/``, a folder of links to exactly that series' files.
    ``model`` (a model folder or checkpoint): channel names and modality from it
    (:func:`medseg.auto.model_folder.read_model_inputs`); only series of its modality become rows.
    ``series`` (``NAME=REGEX`` rules): one row per study instead, channel NAME = the study's one
    series whose SeriesDescription / ProtocolName matches REGEX (``series_dir/<case_id>/<NAME>/``);
    a model with several channels needs a rule for each. ``modality``: only series of it.

    patient_id = keyed pseudonym of PatientID (:mod:`medseg.pseudonyms`); an empty PatientID is
    refused unless ``allow_missing_patient_id`` (then the StudyInstanceUID is keyed). case_id =
    the pseudonym plus the patient's series (``_s<n>``) or study (``_st<n>``) number, never a
    folder name. ``map_file``: also write a CSV (folder, series_uid, case_id, channel, status)
    -- the only link back to the folders, so written owner-only (0600); medseg never reads it,
    keep it where identifiers may be kept.

    ``labels`` = ``"seg"`` or ``"rtstruct"``: each row is paired with the DICOM SEG / RTSTRUCT
    objects under ``root`` that reference its (first channel's) series (by SeriesInstanceUID,
    :mod:`medseg.dicom.pairing`); the union of their segments / ROIs (``select``: a regular
    expression on segment labels / ROI names, default all) becomes a 0/1 label on the image grid,
    written to ``label_dir`` (:func:`medseg.outputs.label_file`) (:mod:`medseg.dicom.seg_reader`,
    :mod:`medseg.dicom.rtstruct`: exact geometry, no resampling). A series without a label
    object stays an unlabelled row (split empty); a series with several takes the first by path,
    with a warning. A label object that cannot be used (damaged, off the grid) refuses its row: a
    :class:`Refusal` naming the object's file name and the problem, no label, its series folder
    removed; the other rows go on. A ``select`` that is no regular expression is one error, raised
    before anything is written.

    Refused series / studies are returned, not raised; raises ``MedsegError`` for bad options and
    when no DICOM series is found at all.
    """
    from medseg.dicom import import_series as dicom_import
    from medseg.pseudonyms import site_secret

    base = Path(root)
    if not base.is_dir():
        raise MedsegError(f"{base}: folder not found")
    if series_dir is None:
        raise MedsegError("import dicom needs a folder for the series folders (--series-dir)")
    links = Path(series_dir)
    if links.resolve() == base.resolve() or links.resolve() in base.resolve().parents:
        raise MedsegError(f"{links}: --series-dir holds the DICOM folder {base}; choose a folder outside it")
    inputs = _dicom_inputs(channel, model, series, modality)
    if select is not None:
        try:
            re.compile(select, re.IGNORECASE)
        except re.error as exc:
            raise MedsegError(f"--select {select!r} is not a valid regular expression ({exc})") from None
    secret = site_secret()
    found = dicom_import.find_series(base, exclude=links)
    if not found:
        raise MedsegError(f"{base}: no DICOM series found (no file with a DICOM header and a SeriesInstanceUID)")
    if inputs.rules:
        rows, refusals = dicom_import.plan_study_rows(found, secret, inputs.rules, inputs.modality, inputs.modality_source,
                                                      allow_missing_patient_id)  # fmt: skip
    else:
        rows, refusals = dicom_import.plan_series_rows(found, secret, inputs.channels[0], inputs.modality,
                                                       inputs.modality_source, allow_missing_patient_id,
                                                       skip_labels=labels is not None)  # fmt: skip
    if labels is not None and rows and label_dir is None:
        raise MedsegError("import dicom --labels needs a folder for the converted labels")
    cases = dicom_import.write_series_folders(rows, links) if rows else []
    if labels is not None and cases:
        refused = _attach_dicom_labels(base, cases, rows, labels, Path(label_dir), select)  # type: ignore[arg-type]
        if refused:
            # a bad label object refuses its row (listed with the others): its links go too
            from medseg.outputs import label_file

            gone = {r.what for r in refused}
            for case in cases:
                if case.case_id in gone:
                    dicom_import.remove_series_folder(links, case.case_id)
                    label_file(Path(label_dir), case.case_id).unlink(missing_ok=True)  # an earlier import's
            rows = [r for r in rows if r.case_id not in gone]
            cases = [c for c in cases if c.case_id not in gone]
            refusals = [*refusals, *refused]
    if map_file is not None:
        records = dicom_import.map_records(rows, refusals)
        _write_private_csv(Path(map_file), records, ["folder", "series_uid", "case_id", "channel", "status"])
    return DicomImport(cases, refusals)


def _write_private_csv(path: Path, records: list[dict[str, str]], columns: list[str]) -> Path:
    """``records`` as a CSV readable by its owner only (mode 0600 from its creation, whatever the
    umask), written atomically: the ``--map-file`` is the one link from pseudonyms back to the
    source folders, so no other account on the machine may read it."""
    import os

    import pandas as pd

    from medseg.atomic import atomic_path

    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an earlier leftover of the same name keeps its mode through O_CREAT
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            pd.DataFrame(records, columns=columns).to_csv(fh, index=False)
    return path


@dataclass(frozen=True)
class _DicomInputs:
    channels: list[str]
    modality: str | None
    modality_source: str  # who wants that modality, for the skip lines
    rules: list[SeriesRule]


def _dicom_inputs(channel: str | None, model: str | Path | None, series: Sequence[str], modality: str | None) -> _DicomInputs:
    """Channels, modality and ``--series`` rules from the options; one clear error for a conflict."""
    rules = [_series_rule(text) for text in series]
    names = [r.name for r in rules]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise MedsegError(f"--series names channel {', '.join(doubled)} twice; give each channel one rule")
    if modality is not None and modality.upper() not in ("CT", "MR"):
        raise MedsegError(f"--modality {modality}: choose CT or MR")
    wanted = modality.upper() if modality else None
    source = f"--modality wants {wanted}" if wanted else ""
    if channel is not None and rules:
        raise MedsegError(f"--channel {channel} names the one channel of one-series rows; with --series the rule "
                          f"names are the channels ({', '.join(names)}): leave --channel out")  # fmt: skip
    if model is None:
        channels = names or [channel_name(channel or "image")]
        return _DicomInputs(channels, wanted, source, rules)
    from medseg.auto.model_folder import read_model_inputs

    inputs = read_model_inputs(model)
    if wanted and wanted != inputs.modality:
        raise MedsegError(f"--modality {wanted} disagrees with the model {model}, which takes {inputs.modality}; "
                          "leave --modality out")  # fmt: skip
    listed = ", ".join(inputs.channels)
    if channel is not None and [channel_name(channel)] != inputs.channels:
        raise MedsegError(f"--channel {channel} disagrees with the model {model}, which takes channel(s) {listed}; "
                          "leave --channel out (the model names the channels)")  # fmt: skip
    if len(inputs.channels) > 1 or rules:
        missing = [c for c in inputs.channels if c not in names]
        extra = [n for n in names if n not in inputs.channels]
        if missing or extra:
            add = " ".join(f"--series {c}=REGEX" for c in missing)
            raise MedsegError(
                f"the model {model} takes channels {listed} ({inputs.modality}), one series each from one study"
                + (f"; add {add} (REGEX matching that series' SeriesDescription or ProtocolName)" if missing else "")
                + (f"; --series {', '.join(extra)}: not a channel of the model" if extra else "")
            )
        order = {c: i for i, c in enumerate(inputs.channels)}
        rules.sort(key=lambda r: order[r.name])
    return _DicomInputs(list(inputs.channels), inputs.modality, f"the model takes {inputs.modality}", rules)


def _series_rule(text: str) -> SeriesRule:
    name, sep, pattern = text.partition("=")
    if not sep or not name.strip() or not pattern:
        raise MedsegError(f"--series {text}: write NAME=REGEX (e.g. --series flair=FLAIR)")
    try:
        compiled = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise MedsegError(f"--series {text}: {pattern!r} is not a valid regular expression ({exc})") from None
    return SeriesRule(channel_name(name), compiled)


def _attach_dicom_labels(
    base: Path, cases: list[Case], rows: list[Row], kind: str, label_dir: Path, select: str | None
) -> list[Refusal]:
    """Label each case from the ``kind`` object referencing its (first channel's) series; returns
    a :class:`Refusal` for each case whose label object (or image) cannot be used -- naming the
    object's file name and the problem -- so that series fails alone and the others go on."""
    import logging

    import numpy as np

    from medseg.dicom.pairing import find_label_objects, read_label_object
    from medseg.errors import OutputError
    from medseg.io import read_volume, write_volume
    from medseg.outputs import label_file

    log = logging.getLogger(__name__)
    objects = find_label_objects(base, kind)  # type: ignore[arg-type]
    if not objects:
        raise MedsegError(f"{base}: no DICOM {kind.upper()} object referencing an image series found")
    labelled = 0
    refusals: list[Refusal] = []
    name = kind.upper()
    for case, row in zip(cases, rows, strict=True):
        series = next(iter(row.series.values()))
        found = objects.get(series.uid, [])
        if not found:
            log.warning("case %s: no %s references its series; left unlabelled", case.case_id, name)
            continue
        if len(found) > 1:
            log.warning("case %s: %d %s objects reference its series; using %s", case.case_id, len(found),
                        name, found[0].name)
        try:
            geometry = read_volume(next(iter(case.images.values()))).geometry
        except OutputError:
            raise
        except MedsegError as exc:
            problem = exc.problem if isinstance(exc, InputFileError) else str(exc)
            refusals.append(Refusal(case.case_id, f"its image series cannot be read ({problem})", tuple(row.series.values())))
            continue
        try:
            mask, used = read_label_object(found[0], kind, geometry, select)  # type: ignore[arg-type]
        except InputFileError as exc:
            refusals.append(Refusal(case.case_id, f"{name} {printable_path(found[0].name)}: {exc.problem}; the series "
                                                  "is left out (fix or remove that file and import again)",
                                    tuple(row.series.values())))  # fmt: skip
            continue
        out = write_volume(mask, geometry, label_file(label_dir, case.case_id), dtype=np.uint8)
        log.info("case %s: label from %s (%s), %d voxel(s)", case.case_id, found[0].name, ", ".join(used), int(mask.sum()))
        case.label, case.split = out.resolve(), "train"
        labelled += 1
    if not labelled and not refusals:
        raise MedsegError(f"{base}: no {kind.upper()} object references any of the {len(cases)} image series")
    return refusals
