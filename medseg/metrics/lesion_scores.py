"""Detection score of each predicted lesion of one case (arrays in, scores out; no file access).

The score ranks predicted lesions for AP (:mod:`medseg.metrics.detection`). Where it comes from
(:class:`ScoreSource`'s ``kind``, recorded per case as ``score_source``):

- ``learned``: an instance model's outputs (Mask R-CNN; the lesion table's ``score_source`` is
  ``learned`` on every row). The predicted lesions **are** the instances of the ``_lesions``
  map (touching lesions stay apart) and each scores its learned ``score_mean``.
- ``lesions_csv``: lesions are the connected components of the mask, each scored by the
  ``score_mean`` of the instance that overlaps it most (ties: the lower id).
- ``probability``: connected components, each scored by the mean of ``_prob`` inside it.
- ``none``: connected components, every one scores 1 -- the AP ranking falls back to lesion
  volume (larger first), and ``summary.json`` says ``"score_source": "none"`` so nobody
  mistakes that AP for a ranked one.

:func:`medseg.evaluation.files.read_score_source` reads the files behind each kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import InputFileError
from medseg.geometry import consecutive_labels
from medseg.metrics.lesion import overlap_table


@dataclass(frozen=True)
class ScoreSource:
    """Where one case's predicted-lesion scores come from (see the module docstring).

    ``kind``: ``learned`` (instances and scores of an instance model), ``lesions_csv``,
    ``probability`` or ``none``. ``prob``: the ``_prob`` array and
    ``instances``: the ``_lesions`` array, ``(I, J, K)`` on the mask's grid (or the same crop of
    it); ``instance_scores``: ``score_mean`` by instance id; ``path``: the file errors name.
    """

    kind: str = "none"
    prob: np.ndarray | None = None
    instances: np.ndarray | None = None
    instance_scores: dict[int, float] | None = None
    path: Path | None = None

    def crop(self, box: tuple[slice, ...]) -> ScoreSource:
        return ScoreSource(
            self.kind,
            None if self.prob is None else self.prob[box],
            None if self.instances is None else self.instances[box],
            self.instance_scores,
            self.path,
        )

    def learned_lesions(self, pred_mask: np.ndarray, box: tuple[slice, ...], where: str) -> tuple[np.ndarray, int, np.ndarray]:
        """An instance model's lesions inside ``pred_mask`` (a region's mask on the sub-box ``box``
        of this source's arrays): (labels 1..n, n, learned score of each)."""
        assert self.instances is not None and self.instance_scores is not None
        inst = np.where(pred_mask, self.instances[box], 0)
        if (pred_mask & (inst == 0)).any():
            raise InputFileError(self.path or "", f"{where}: predicted voxels lie outside every lesion instance")
        labels, old = consecutive_labels(inst)
        return labels, int(old.size), self._table_scores(old, where)

    def _table_scores(self, ids: np.ndarray, where: str) -> np.ndarray:
        """The table's ``score_mean`` of each instance id in ``ids``; an id without a row is an
        ``InputFileError``."""
        assert self.instance_scores is not None
        unknown = sorted({int(i) for i in ids} - set(self.instance_scores))
        if unknown:
            raise InputFileError(
                self.path or "", f"{where}: lesion_id(s) {unknown[:10]} have no row in this table"
            )
        return np.array([self.instance_scores[int(i)] for i in ids], dtype=np.float64)

    def lesion_scores(
        self, pred_labels: np.ndarray, n_pred: int, box: tuple[slice, ...], where: str
    ) -> np.ndarray:
        """``(n_pred,)`` score of each predicted lesion of ``pred_labels`` (a label map of the
        sub-box ``box`` of this source's arrays)."""
        if self.instances is not None and self.instance_scores is not None:
            inst = np.where(pred_labels > 0, self.instances[box], 0).astype(np.int64, copy=False)
            link = overlap_table(pred_labels, inst, n_pred, int(inst.max(initial=0)))
            best = np.zeros(n_pred, dtype=np.int64)
            best_count = np.zeros(n_pred, dtype=np.int64)
            # pairs come sorted by (lesion, instance id): a strict ">" keeps the lower id on ties
            for lesion, instance, count in zip(link.pair_ref, link.pair_pred, link.pair_inter, strict=True):
                if count > best_count[lesion - 1]:
                    best[lesion - 1], best_count[lesion - 1] = instance, count
            if (best == 0).any():
                raise InputFileError(
                    self.path or "", f"{where}: a predicted lesion lies outside every lesion instance"
                )
            return self._table_scores(best, where)
        if self.prob is not None:
            flat = pred_labels.ravel()
            sums = np.bincount(flat, weights=self.prob[box].ravel(), minlength=n_pred + 1)[1:]
            return sums / np.maximum(np.bincount(flat, minlength=n_pred + 1)[1:], 1)
        return np.ones(n_pred, dtype=np.float64)
