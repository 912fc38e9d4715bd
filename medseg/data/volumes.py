"""Preprocessed training volumes: the shared preprocessing chain, cached on disk by fingerprint.

Every case goes through ``medseg.transforms.preprocessing.preprocess_transforms`` (the chain inference
uses too) once; the result is stored slice-major for fast 2.5D access:

- ``image``: (C, S, H, W) float32 — channels in manifest order, then slices along
  ``preprocess.slice_axis``, then the two in-plane axes in RAS order (axial: S, then R, A;
  coronal: A, then R, S; sagittal: R, then A, S). ``image[:, s]`` is exactly the slice that
  ``context_stack(volume_cras, s, k, axis=slice_axis)`` takes from the (C, R, A, S) volume.
- ``label``: (S, H, W) uint8 0/1; for instance models (``instances=True``) the lesion instances
  of each slice instead, ids 1..n per slice (0 background): ``data.labels.instances``
  ``components`` = 8-connected components of the slice's mask, ``values`` = one id per distinct
  raw value (an instance-labelled reference). Every consumer that wants the mask reads ``label > 0``.
- ``spacing``: voxel size in mm along (S, H, W).
- ``soft_label`` (distillation, :mod:`medseg.auto.distill`; ``None`` otherwise): (S, H, W)
  float32 in [0, 1], a teacher's foreground probability on this grid; samples then carry it as
  their target, and ``label`` holds ``soft_label >= 0.5`` (what the slice index and the
  lesion-aware sampling read). Never cached on disk.

The on-disk cache (``train.cache_dir``) holds one ``<case_id>-<fingerprint>.pt`` per case; the
fingerprint covers the image and label files (path, size, modification time), the channels,
modality, label mapping, every preprocessing setting that changes the volume, and the source
of the preprocessing modules, so a change to any of them preprocesses the case again.
Files are written atomically and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medseg.atomic import atomic_path
from medseg.config import LabelConfig, PreprocessConfig
from medseg.errors import InputFileError, MedsegError
from medseg.progress import progress_enabled

if TYPE_CHECKING:
    from monai.transforms import Compose
from medseg.geometry import AXIS_INDEX, label_foreground
from medseg.manifest import Case

CACHE_VERSION = 1
SLICE_AXIS = AXIS_INDEX  # spatial axis of the (R, A, S) volume per slice plane (medseg.geometry)
log = logging.getLogger(__name__)


@dataclass
class TrainVolume:
    """One preprocessed case (see the module docstring for shapes and axis order)."""

    case_id: str
    image: torch.Tensor
    label: torch.Tensor
    spacing: tuple[float, float, float]
    instances: bool = False  # ``label`` holds per-slice instance ids (module docstring)
    soft_label: torch.Tensor | None = None  # (S, H, W) float32 teacher probability (module docstring)

    @property
    def n_slices(self) -> int:
        return int(self.image.shape[1])


def _code_digest() -> str:
    import medseg.io
    import medseg.io_dicom
    import medseg.transforms.loading
    import medseg.transforms.preprocessing
    import medseg.volume

    modules = (medseg.io, medseg.io_dicom, medseg.volume, medseg.transforms.preprocessing, medseg.transforms.loading)  # the reading code
    text = "".join(inspect.getsource(m) for m in modules)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(case: Case, preprocess: PreprocessConfig, labels: LabelConfig, instances: bool = False) -> str:
    """Hex digest identifying ``case``'s preprocessed volume (see the module docstring)."""
    files = []
    for role, path in [*case.images.items(), ("label", case.label)]:
        if path is None:
            raise MedsegError(f"case {case.case_id}: training needs a label file")
        stat = Path(path).stat()
        files.append([role, str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns])
    settings = preprocess.model_dump(mode="json")
    settings.pop("context_slices")  # chooses neighbours at sampling time; the volume is the same
    payload = {
        "version": CACHE_VERSION,
        "code": _code_digest(),
        "modality": case.modality,
        "files": files,
        "preprocess": settings,
        "labels": labels.model_dump(mode="json"),
        "instances": instances,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def slice_instances(label: np.ndarray, values: bool, where: str) -> np.ndarray:
    """(S, H, W) label (0/1 mask, or raw instance values with ``values``) -> uint8 instance ids
    1..n per slice: 8-connected components of each slice's mask, or one id per distinct value.
    Raises ``MedsegError`` naming ``where`` when a slice holds more than 255 lesions."""
    out = np.zeros(label.shape, dtype=np.uint8)
    for z in np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1)):
        plane = label[z]
        if values:
            ids = np.unique(plane, return_inverse=True)[1].reshape(plane.shape)  # 0 stays 0 (the smallest value)
            n = int(ids.max())
        else:
            ids, n = label_foreground(np.ascontiguousarray(plane > 0), connectivity=8)
        if n > 255:
            raise MedsegError(f"{where}: slice {z} holds {n} lesions; instance training handles at most 255 per slice")
        out[z] = ids
    return out


def check_not_constant(image: torch.Tensor | np.ndarray, path: str | Path) -> None:
    """Raise ``InputFileError`` naming ``path`` when every voxel of ``image`` (one channel as
    read, before normalisation) holds one value: an empty or failed export, which normalisation
    would turn into a plausible-looking input (a blank scan got 16 % of its voxels as lesion)."""
    tensor = torch.as_tensor(image)
    if tensor.numel() == 0:
        return
    lo, hi = torch.aminmax(tensor)
    if lo == hi:
        raise InputFileError(path, f"image is constant (all voxels {lo.item():g}): an empty or failed export?")


def apply_checked_chain(chain: Compose, data: dict[str, Any], image_keys: Sequence[str]) -> dict[str, Any]:
    """``apply_chain(chain, data)`` with :func:`check_not_constant` on each of ``image_keys``
    (file paths in ``data``) right after the chain's ``LoadVolumed`` has read them."""
    from medseg.transforms.loading import LoadVolumed, apply_chain

    transforms = list(chain.transforms)
    split = next((i + 1 for i, t in enumerate(transforms) if isinstance(t, LoadVolumed)), None)
    if split is None:  # not a chain that reads files
        return apply_chain(chain, data)
    paths = {key: data[key] for key in image_keys}
    loaded = apply_chain(_sub_chain(chain, transforms[:split]), data)
    for key in image_keys:
        check_not_constant(loaded[key], paths[key])
    return apply_chain(_sub_chain(chain, transforms[split:]), loaded)


def _sub_chain(chain: Compose, transforms: list[Any]) -> Compose:
    """``transforms`` (a part of ``chain``) as a chain with ``chain``'s own settings; the
    operations they record are the same, so ``Invertd`` with the whole chain still inverts them."""
    from monai.transforms import Compose

    return Compose(transforms, map_items=chain.map_items, unpack_items=chain.unpack_items, log_stats=chain.log_stats,
                   lazy=chain.lazy, overrides=chain.overrides)


def preprocess_case(case: Case, preprocess: PreprocessConfig, labels: LabelConfig, instances: bool = False,
                    use_label: bool = True) -> TrainVolume:
    """Run the shared preprocessing chain on one labelled case; return it slice-major (with
    ``instances``: per-slice instance ids as the label, module docstring).

    ``use_label=False`` (distillation: the targets come from a teacher): the label file is never
    read, the case may have none, and ``label`` is all 0 on the image's grid (the same grid: the
    chain's crop reads only the image)."""
    from medseg.transforms.preprocessing import IMAGE_KEY, LABEL_KEY, channel_key, preprocess_transforms
    if case.label is None and use_label:
        raise MedsegError(f"case {case.case_id}: training needs a label file")
    values = instances and labels.instances == "values"
    chain = preprocess_transforms(preprocess, case.modality, case.channels, with_label=use_label, label_cfg=labels,
                                  label_values=values)
    data = {channel_key(c): str(p) for c, p in case.images.items()}
    if use_label:
        data[LABEL_KEY] = str(case.label)
    out = apply_checked_chain(chain, data, [channel_key(c) for c in case.images])
    image = out[IMAGE_KEY]
    affine = np.asarray(image.affine, dtype=np.float64)
    spacing_ras = np.linalg.norm(affine[:3, :3], axis=0)
    axis = SLICE_AXIS[preprocess.slice_axis]
    order = [axis, *[a for a in range(3) if a != axis]]
    if use_label:
        slice_major = torch.movedim(out[LABEL_KEY].as_tensor()[0], axis, 0).contiguous()
    else:
        slice_major = torch.zeros(torch.movedim(image.as_tensor()[0], axis, 0).shape, dtype=torch.uint8)
    if instances:
        slice_major = torch.from_numpy(slice_instances(slice_major.numpy(), values, f"case {case.case_id}"))
    return TrainVolume(
        case_id=case.case_id,
        image=torch.movedim(image.as_tensor(), axis + 1, 1).contiguous().float(),
        label=slice_major.to(torch.uint8),
        spacing=tuple(float(spacing_ras[a]) for a in order),  # type: ignore[arg-type]
        instances=instances,
    )


def _cache_file(cache_dir: Path, case: Case, digest: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in case.case_id)
    return cache_dir / f"{safe}-{digest[:20]}.pt"


def _save(volume: TrainVolume, path: Path) -> None:
    payload = {"case_id": volume.case_id, "image": volume.image, "label": volume.label, "spacing": list(volume.spacing),
               "instances": volume.instances}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load(path: Path) -> TrainVolume | None:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return TrainVolume(payload["case_id"], payload["image"], payload["label"], tuple(payload["spacing"]),
                           bool(payload.get("instances", False)))
    except Exception as exc:  # a damaged cache entry is rebuilt, never trusted
        log.warning("ignoring unreadable cache file %s (%s)", path, exc)
        return None


def load_volume(
    case: Case, preprocess: PreprocessConfig, labels: LabelConfig, cache_dir: str | Path | None = None,
    instances: bool = False,
) -> TrainVolume:
    """The preprocessed volume of ``case``, from ``cache_dir`` when present there (else built
    and, with a ``cache_dir``, stored); ``instances``: per-slice instance ids as the label."""
    if cache_dir is None:
        return preprocess_case(case, preprocess, labels, instances)
    path = _cache_file(Path(cache_dir), case, fingerprint(case, preprocess, labels, instances))
    if path.is_file():
        volume = _load(path)
        if volume is not None:
            return volume
    volume = preprocess_case(case, preprocess, labels, instances)
    _save(volume, path)
    return volume


def load_volumes(
    cases: Sequence[Case],
    preprocess: PreprocessConfig,
    labels: LabelConfig,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    instances: bool = False,
) -> list[TrainVolume]:
    """``load_volume`` for each case, in order (with a tqdm bar when ``progress``, on a terminal)."""
    from tqdm import tqdm

    return [
        load_volume(case, preprocess, labels, cache_dir, instances)
        for case in tqdm(cases, desc="preprocess", unit="case", disable=not progress_enabled(progress), leave=False)
    ]
