"""Manifest cases -> an nnU-Net v2 raw dataset; medseg's folds -> nnU-Net's ``splits_final.json``.

The inverse of :func:`medseg.importers.import_nnunet`, so that nnU-Net can train on exactly the
cases and folds medseg cross-validated (``benchmarks/peer_nnunet.py``). No nnU-Net import: the
files follow nnU-Net v2's documented raw-dataset format.

Layout written by :func:`export_nnunet`::

    <out_dir>/Dataset<ID>_<Name>/
        dataset.json                  channel_names (the manifest's channel order), labels
                                      {background: 0, lesion: 1}, numTraining, file_ending,
                                      overwrite_image_reader_writer SimpleITKIO
        imagesTr/<case>_<XXXX>.nii.gz labelled cases; XXXX = the channel's index (0000, 0001, ...)
        labelsTr/<case>.nii.gz        the label mapped to 0/1 by ``data.labels`` (uint8)
        imagesTs/<case>_<XXXX>.nii.gz cases without a label

=====================  ==================================================================
what                   rule
=====================  ==================================================================
case identifier        the manifest's ``case_id`` unchanged (splits and predictions use it)
image, ``.nii.gz``     ``link="symlink"``: an absolute symbolic link (byte for byte the
                       source, geometry untouched); ``link="copy"``: a copy of the file
image, other format    (``.nii``, NRRD, MHA, a DICOM series) read with :mod:`medseg.io` and
                       written as ``.nii.gz`` with its grid (size, spacing, origin,
                       direction) and dtype
label                  :func:`medseg.labels.read_label` (raises on values ``data.labels``
                       refuses) written as uint8 0/1 on the label's grid, which must be the
                       first image's grid (nnU-Net refuses mismatched grids later, less
                       clearly)
channel names          MR: the manifest's names; CT: ``CT`` for every channel, the name by
                       which nnU-Net picks its CT normalisation (any other name is z-scored
                       per case). ``import_nnunet`` then reads the channel back as ``ct``
=====================  ==================================================================

Re-exporting into an existing dataset folder replaces its files and removes case files that
are no longer exported, so the folder always holds exactly ``cases``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medseg import atomic
from medseg.auto.folds import read_folds
from medseg.config import LabelConfig
from medseg.errors import ConfigError, InputFileError, MedsegError
from medseg.geometry import grid_mismatch
from medseg.io import Geometry, read_volume, write_mask, write_volume
from medseg.labels import read_label
from medseg.manifest import Case

FILE_ENDING = ".nii.gz"
DATASET_JSON = "dataset.json"
SPLITS_FILE = "splits_final.json"
LABELS = {"background": 0, "lesion": 1}
IMAGES_TR, LABELS_TR, IMAGES_TS = "imagesTr", "labelsTr", "imagesTs"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
LINK_MODES = ("symlink", "copy")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset<ID>_<Name>`` (ID zero-padded to 3 digits); ``ConfigError`` for an id outside
    1..999 or a name nnU-Net cannot take (letters, digits, ``_``, ``-``)."""
    if not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ConfigError(f"nnU-Net dataset id must be an integer in 1..999, got {dataset_id!r}")
    if not NAME_RE.match(name):
        raise ConfigError(f"nnU-Net dataset name {name!r}: use letters, digits, '_' and '-' only")
    return f"Dataset{dataset_id:03d}_{name}"


def channel_names(cases: Sequence[Case]) -> dict[str, str]:
    """dataset.json's ``channel_names``: index (str) -> name, in the manifest's channel order.
    Raises ``MedsegError`` naming the first case whose channels differ from the first case's."""
    if not cases:
        raise MedsegError("no case to export to nnU-Net")
    first = cases[0]
    for case in cases[1:]:
        if case.channels != first.channels:
            raise MedsegError(f"{case.where}: channels {case.channels} differ from {first.where}'s {first.channels}; "
                              "every exported case needs the same channels in the same order")  # fmt: skip
    ct = first.modality.upper() == "CT"
    return {str(i): ("CT" if ct else name) for i, name in enumerate(first.channels)}


def export_nnunet(
    cases: Sequence[Case],
    out_dir: str | Path,
    dataset_id: int,
    name: str,
    labels_cfg: LabelConfig | None = None,
    link: str = "symlink",
) -> Path:
    """Write ``cases`` as the nnU-Net v2 raw dataset ``out_dir/Dataset<ID>_<Name>`` (module
    docstring) and return that folder.

    Raises ``InputFileError`` naming the file for a missing or unreadable image or label, a label
    whose values ``labels_cfg`` refuses or whose grid differs from the first image's;
    ``ConfigError`` for a bad id, name or ``link``, or when ``out_dir`` already holds another
    dataset with the same id (nnU-Net could not tell them apart); ``MedsegError`` for cases with
    different channels or duplicated case ids.
    """
    if link not in LINK_MODES:
        raise ConfigError(f"link must be one of {LINK_MODES}, got {link!r}")
    folder_name = dataset_folder_name(dataset_id, name)
    root = Path(out_dir)
    clash = [p.name for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.name != folder_name]
    if clash:
        raise ConfigError(f"{root}: already holds {clash[0]} with dataset id {dataset_id}; "
                          "choose another id or remove it (nnU-Net finds datasets by id)")  # fmt: skip
    names = channel_names(cases)
    ids = [c.case_id for c in cases]
    doubled = sorted({i for i in ids if ids.count(i) > 1})
    if doubled:
        raise MedsegError(f"case id {doubled[0]!r} appears more than once; nnU-Net identifiers must be unique")
    labels_cfg = labels_cfg or LabelConfig()
    dataset = root / folder_name
    written: dict[str, set[str]] = {IMAGES_TR: set(), LABELS_TR: set(), IMAGES_TS: set()}
    for case in cases:
        files = [*((f"image_{ch}", p) for ch, p in case.images.items()), *([("label", case.label)] if case.label else [])]
        for column, path in files:
            if not Path(path).exists():
                raise InputFileError(path, f"file not found ({case.where}, column {column})")
        folder = IMAGES_TR if case.label is not None else IMAGES_TS
        first_grid: Geometry | None = None
        for index, channel in enumerate(case.channels):
            target = dataset / folder / f"{case.case_id}_{index:04d}{FILE_ENDING}"
            grid = _export_image(case.images[channel], target, link)
            first_grid = grid if index == 0 else first_grid
            written[folder].add(target.name)
        if case.label is not None:
            target = dataset / LABELS_TR / f"{case.case_id}{FILE_ENDING}"
            _export_label(case.label, target, labels_cfg, first_grid)
            written[LABELS_TR].add(target.name)
    for folder, keep in written.items():
        _remove_stale(dataset / folder, keep)
    spec = {
        "channel_names": names,
        "labels": dict(LABELS),
        "numTraining": len(written[LABELS_TR]),
        "file_ending": FILE_ENDING,
        "overwrite_image_reader_writer": "SimpleITKIO",
        "description": "exported by medseg.nnunet_export (label: data.labels foreground -> 1)",
    }
    atomic.write_json(dataset / DATASET_JSON, spec)
    return dataset


def _export_image(source: Path, target: Path, link: str) -> Geometry | None:
    """Link/copy a ``.nii.gz`` (returns None: its grid is read only when a label needs it) or
    convert any other volume to ``.nii.gz`` with its grid and dtype (returns the grid)."""
    source = Path(source)
    if source.is_file() and source.name.lower().endswith(FILE_ENDING):
        with atomic.atomic_path(target) as tmp:
            if link == "symlink":
                os.symlink(source.resolve(), tmp)
            else:
                shutil.copyfile(source, tmp)
        return None
    volume = read_volume(source)
    write_volume(volume.array, volume, target, dtype=volume.array.dtype)
    return volume.geometry


def _export_label(source: Path, target: Path, cfg: LabelConfig, image_grid: Geometry | None) -> None:
    """The label mapped to uint8 0/1, written on its own grid after checking it is the image's."""
    label = read_label(source, cfg)
    if image_grid is None:
        image_grid = _header_geometry(target.parent.parent / IMAGES_TR / f"{target.name[: -len(FILE_ENDING)]}_0000{FILE_ENDING}")
    problem = grid_mismatch(label.shape, label.affine, image_grid.size, image_grid.affine)
    if problem:
        raise InputFileError(source, f"label grid differs from the case's first image ({problem}); nnU-Net needs "
                                     "every channel and the label on one grid")  # fmt: skip
    write_mask(np.asarray(label.array, dtype=np.uint8), label, target)


def _header_geometry(path: Path) -> Geometry:
    """The grid of a NIfTI file from its header alone (no voxel data read)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputFileError(path, f"cannot read the image header ({str(exc).strip().splitlines()[-1]})") from None
    size = reader.GetSize()
    if len(size) != 3:
        raise InputFileError(path, f"is {len(size)}-D; nnU-Net export takes 3-D volumes")
    return Geometry(size=tuple(size), spacing=tuple(reader.GetSpacing()), origin=tuple(reader.GetOrigin()),  # type: ignore[arg-type]
                    direction=tuple(reader.GetDirection()))  # fmt: skip


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Remove case files of an earlier export that this export did not write."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.endswith(FILE_ENDING) and path.name not in keep and (path.is_file() or path.is_symlink()):
            path.unlink()


def nnunet_splits(folds_json: str | Path) -> list[dict[str, list[str]]]:
    """medseg's folds (``folds.json``) as nnU-Net splits: fold k's ``val`` = the case ids of its
    held-out patients, ``train`` = every other pool case (sorted). ``ConfigError`` naming the
    file when it is unreadable or a fold lists a case outside the pool."""
    path = Path(folds_json)
    folds = read_folds(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    pool = set(folds.case_ids)
    splits = []
    for k, fold in enumerate(data["folds"]):
        val = sorted(str(c) for c in fold.get("case_ids", []))
        if not val:
            raise ConfigError(f"{path}: fold {k} lists no case_ids (re-create the folds with this medseg version)")
        outside = sorted(set(val) - pool)
        if outside:
            raise ConfigError(f"{path}: fold {k} holds case {outside[0]!r}, which is not in pool_case_ids")
        splits.append({"train": sorted(pool - set(val)), "val": val})
    return splits


def write_splits(folds_json: str | Path, out_path: str | Path) -> Path:
    """Write :func:`nnunet_splits` of ``folds_json`` as nnU-Net's ``splits_final.json`` at
    ``out_path`` (a file path, or a folder to hold ``splits_final.json``)."""
    out = Path(out_path)
    if out.is_dir():
        out = out / SPLITS_FILE
    return atomic.write_json(out, nnunet_splits(folds_json))


__all__ = ["DATASET_JSON", "SPLITS_FILE", "channel_names", "dataset_folder_name", "export_nnunet", "nnunet_splits",
           "write_splits"]
