"""Cases to predict: from a manifest or from ``--input`` paths.

``--input`` syntax (``medseg infer``): each ``--input`` occurrence is **one case** and lists
one path per input channel of the checkpoint, in the checkpoint's channel order, or as
``channel=path`` in any order; ``case=NAME`` sets the case id. For a single-channel
checkpoint, every path is its own case, so ``--input a.nii.gz b.nrrd dicom_folder/`` predicts
three cases. Paths are files (NIfTI, NRRD, MHA/MHD) or DICOM series folders.

Case ids name the output files, so they never come from DICOM tags: the manifest's
``case_id``, ``case=NAME``, or the first channel's file name without its extension and a
trailing ``_<channel>`` (``Brats18_X_flair.nii.gz`` -> ``Brats18_X``), or the folder name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import MedsegError, is_utf8_text
from medseg.io import VOLUME_SUFFIXES
from medseg.manifest import case_id_problem, read_manifest


@dataclass
class InferenceCase:
    """One case to predict. ``images``: channel -> path in the checkpoint's channel order.

    ``problem``: an input problem found while parsing (wrong number of paths, modality...) or by
    :mod:`.preflight`; the batch records it in ``failures.csv`` before predicting any case.
    """

    case_id: str
    images: dict[str, Path]
    modality: str | None = None
    problem: str | None = None
    new_frame_of_reference: bool = False  # its DICOM SEG gets a new Frame of Reference UID (preflight)


def case_id_from_path(path: Path, channel: str | None = None) -> str:
    """File name without its volume extension (and a trailing ``_<channel>``), or a folder's name.

    A name whose bytes are not UTF-8 (a Latin-1 file name on a UTF-8 system) is read as Latin-1,
    so the id can name output files and be written into tables (``caf\xe9.nii`` -> ``café``).
    """
    name = path.name if path.name not in ("", ".", "..") else path.resolve().name
    if not is_utf8_text(name):
        name = os.fsencode(name).decode("latin-1")
    lower = name.lower()
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if channel and name.lower().endswith(f"_{channel.lower()}") and len(name) > len(channel) + 1:
        name = name[: -len(channel) - 1]
    return name


def cases_from_manifest(path: str | Path, channels: list[str], modality: str, split: str | None = None) -> list[InferenceCase]:
    """Every manifest row (or those of ``split``) as an ``InferenceCase``.

    Raises ``MedsegError`` when the manifest's channel columns differ from ``channels`` (the
    model's; :func:`channel_binding`: a one-channel model takes any one image column); a row
    whose image file is missing or whose modality differs from ``modality`` gets a ``problem``
    (that case fails, the others run). Label files are not needed and not checked.
    """
    rows = read_manifest(path, check_files=False)
    if split is not None:
        rows = [r for r in rows if r.split == split]
        if not rows:
            raise MedsegError(f"{path}: no manifest row has split {split!r}")
    binding = channel_binding(rows[0].channels, channels, path)
    cases = []
    for row in rows:
        problem = row.check_files(label=False)
        if problem is None and row.modality != modality:
            problem = (f"case modality is {row.modality} but the model was trained on {modality}; give {modality} "
                       f"scans or a model trained on {row.modality}")
        cases.append(InferenceCase(row.case_id, {c: row.images[binding[c]] for c in channels}, row.modality, problem))
    return cases


def channel_binding(have: list[str], channels: list[str], path: str | Path) -> dict[str, str]:
    """Model channel -> manifest channel. The names must match, except that a one-channel model
    takes a manifest's one image column whatever its name (said in one log line). Raises
    ``MedsegError`` naming the columns needed otherwise."""
    import logging

    if sorted(have) == sorted(channels):
        return {c: c for c in channels}
    if len(have) == 1 and len(channels) == 1:
        logging.getLogger(__name__).info("%s: column image_%s is the model's one channel %r", path, have[0], channels[0])
        return {channels[0]: have[0]}
    raise MedsegError(
        f"{path}: manifest channels {have} differ from the model's {channels}; the manifest needs the columns "
        f"{['image_' + c for c in channels]} (medseg import dicom --model MODEL writes them)"
    )


def _group_case(group: list[str], channels: list[str]) -> InferenceCase:
    named: dict[str, str] = {}
    plain: list[str] = []
    case_id: str | None = None
    for token in group:
        key, sep, value = token.partition("=")
        if sep and key == "case":
            case_id = value
        elif sep and key in channels:
            named[key] = value
        else:
            plain.append(token)
    problem = None
    if named and plain:
        problem = f"mix of named (channel=path) and plain paths {plain}; name every channel or none"
    elif plain and len(plain) != len(channels):
        problem = f"{len(plain)} path(s) given but the checkpoint needs {len(channels)} channels {channels} (one path per channel, in that order)"
    elif named and sorted(named) != sorted(channels):
        problem = f"channels {sorted(named)} given but the checkpoint needs {channels}"
    images = {c: Path(named[c]) for c in channels if c in named} if named else dict(zip(channels, map(Path, plain), strict=False))
    if case_id is None:
        first = images.get(channels[0]) or (Path(group[0].partition("=")[2] or group[0]))
        case_id = case_id_from_path(first, channels[0])
    return InferenceCase(case_id, images, None, problem)


def cases_from_inputs(groups: list[list[str]], channels: list[str]) -> list[InferenceCase]:
    """``--input`` groups -> cases (syntax: module docstring)."""
    if not groups or not any(groups):
        raise MedsegError("--input: no path given")
    cases: list[InferenceCase] = []
    for group in groups:
        if len(channels) == 1 and not any(t.startswith("case=") for t in group):
            cases += [_group_case([token], channels) for token in group]
        else:
            cases.append(_group_case(group, channels))
    return cases


def check_cases(cases: list[InferenceCase]) -> list[InferenceCase]:
    """Raise ``MedsegError`` for duplicate case ids; mark unusable ids and missing files as problems."""
    seen: dict[str, int] = {}
    for case in cases:
        seen[case.case_id] = seen.get(case.case_id, 0) + 1
    duplicates = sorted(k for k, v in seen.items() if v > 1)
    if duplicates:
        raise MedsegError(f"duplicate case id(s) {duplicates}: give each input a distinct case=NAME or file name")
    for case in cases:
        if case.problem is None:
            case.problem = case_id_problem(case.case_id)
        if case.problem is None:
            missing = [str(p) for p in case.images.values() if not p.exists()]
            if missing:
                case.problem = f"file(s) not found: {missing}"
    return cases
