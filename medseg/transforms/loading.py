"""MONAI dict-transform chains, built from config.

Each transform that MONAI lacks comes as an array transform plus its dictionary twin
(MONAI's habit): ``MapLabels``/``MapLabelsd``, ``CheckSameGridd``.

Shapes: after ``LoadImaged`` + ``EnsureChannelFirstd`` every key holds a MetaTensor
(C, I, J, K); after ``Orientationd("RAS")`` the spatial axes are (R, A, S): axis 1 runs
left->right, axis 2 posterior->anterior, axis 3 inferior->superior (no interpolation: only
flips and axis permutations, to the closest RAS axes for oblique grids).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    MapTransform,
    Orientationd,
    Transform,
)

from medseg.config import LabelConfig
from medseg.errors import GeometryMismatchError
from medseg.geometry import grid_mismatch
from medseg.io import SimpleITKReader
from medseg.labels import map_labels


def _source_name(data: Any) -> str:
    if isinstance(data, MetaTensor):
        return str(data.meta.get("filename_or_obj", "<array>"))
    return "<array>"


class MapLabels(Transform):
    """Raw label values -> uint8 binary lesion mask (0/1), per ``LabelConfig``; with
    ``keep_values``, int32 raw values on the lesion voxels (0 elsewhere) for instance labels.

    Input/output: array or MetaTensor of any shape (typically (1, I, J, K)); meta is kept.
    Unexpected values raise ``InputFileError`` naming the source file.
    """

    def __init__(self, cfg: LabelConfig | None = None, keep_values: bool = False) -> None:
        self.cfg = cfg or LabelConfig()
        self.keep_values = keep_values

    def __call__(self, label: Any) -> Any:
        array = np.asarray(label)
        mapped = map_labels(array, self.cfg, _source_name(label))
        if self.keep_values:  # instance-labelled reference: each lesion keeps its own value
            mapped = np.where(mapped > 0, array, 0).astype(np.int32)
        if isinstance(label, MetaTensor):
            out = MetaTensor(torch.from_numpy(mapped), meta=label.meta)
            return out
        return mapped


class MapLabelsd(MapTransform):
    """Dictionary twin of ``MapLabels``."""

    def __init__(self, keys: KeysCollection, cfg: LabelConfig | None = None, allow_missing_keys: bool = False,
                 keep_values: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mapper = MapLabels(cfg, keep_values)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.mapper(d[key])
        return d


class CheckSameGridd(MapTransform):
    """Raise ``GeometryMismatchError`` unless all ``keys`` share spatial shape and affine.

    Expects MetaTensors (C, I, J, K) straight after loading (before any spatial transform).
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = list(self.key_iterator(d))
        if len(present) < 2:
            return d
        ref_key = present[0]
        ref = d[ref_key]
        for key in present[1:]:
            other = d[key]
            problem = grid_mismatch(ref.shape[-3:], np.asarray(ref.affine), other.shape[-3:], np.asarray(other.affine))
            if problem is not None:
                raise GeometryMismatchError(
                    f"grid mismatch: {_source_name(ref)} ({ref_key}) vs {_source_name(other)} ({key}): {problem}; "
                    "they must share one voxel grid"
                )
        return d


class LoadVolumed(LoadImaged):
    """``LoadImaged`` that always reads with ``SimpleITKReader``.

    A plain ``LoadImaged(reader=...)`` falls back to MONAI's other readers when ours raises,
    so a 4-D or truncated file that we reject would be loaded anyway by nibabel. Passing the
    reader at call time disables that fallback and lets our error (naming the file) through.

    Several keys (channels, label) are read concurrently, one thread each: decompression and
    the axis-reordering copy release the GIL (docs/benchmarks.md). The first failing key's
    error is raised.
    """

    def __init__(self, keys: KeysCollection, check_finite: bool = True, **kwargs: Any) -> None:
        self._volume_reader = SimpleITKReader(check_finite=check_finite)
        with warnings.catch_warnings():
            # LoadImage also builds MONAI's default readers (never used here); with pydicom installed
            # one of them warns on every construction that its GPU decoder plugin is missing
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)
            logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
            super().__init__(keys, reader=self._volume_reader, image_only=True, **kwargs)

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        chosen = reader or self._volume_reader
        d = dict(data)
        keys = list(self.key_iterator(d))
        if len(keys) < 2:
            return super().__call__(d, chosen)
        with ThreadPoolExecutor(max_workers=len(keys), thread_name_prefix="medseg-load") as pool:
            futures = [pool.submit(self._loader, d[key], chosen) for key in keys]
            for key, future in zip(keys, futures, strict=True):
                d[key] = future.result()
        return d


def load_transforms(
    image_keys: Sequence[str],
    label_key: str | None,
    label_cfg: LabelConfig | None = None,
    orient: bool = True,
) -> Compose:
    """Load -> check grids -> map labels -> channel-first -> orient to RAS.

    Output dict: each image key (1, R, A, S) float MetaTensor, label key (1, R, A, S) uint8 0/1.
    """
    keys = [*image_keys, *([label_key] if label_key else [])]
    chain: list[Any] = [
        LoadVolumed(keys),
        CheckSameGridd(keys),
    ]
    if label_key:
        chain.append(MapLabelsd([label_key], label_cfg))
    chain.append(EnsureChannelFirstd(keys, channel_dim="no_channel"))
    if orient:
        chain.append(Orientationd(keys, axcodes="RAS", labels=None))
    return Compose(chain)


def apply_chain(chain: Compose, data: dict[str, Any]) -> dict[str, Any]:
    """Run a transform chain, re-raising our own user-facing errors unwrapped.

    MONAI wraps every exception in ``RuntimeError("applying transform ...")``; a user should
    see "file X is truncated", not a transform traceback.
    """
    from medseg.errors import MedsegError

    try:
        return chain(data)
    except RuntimeError as exc:
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, MedsegError):
                raise cause from None
            cause = cause.__cause__
        raise
