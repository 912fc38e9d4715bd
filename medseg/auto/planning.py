"""Experiment planning: a manifest -> a full medseg config, by documented rules.

Like nnU-Net's experiment planner, for medseg's 2D/2.5D models: :func:`plan_dataset` reads a
manifest, fingerprints its cross-validation pool (:mod:`medseg.auto.fingerprint`; test cases are
never read), applies the rules (:mod:`medseg.auto.plan_rules`: the rule table, one ``determine_*``
function per decision, composed by :func:`plan_from_fingerprint`), times the planned model's
training steps on this machine (:mod:`medseg.auto.plan_speed`) and writes the config YAML with one
comment line per decision, plus ``fingerprint.json`` beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from medseg.auto.plan_rules import (
    DEFAULT_MINUTES,
    MeasuredSpeed,
    Plan,
    plan_from_fingerprint,
    plan_yaml,
    round_patch,
)
from medseg.auto.plan_speed import measure_speed
from medseg.config import LabelConfig
from medseg.errors import ConfigError, ManifestError, MedsegError

# the rules' and the measurement's public names, importable from here as before the split
__all__ = ["DEFAULT_MINUTES", "MeasuredSpeed", "Plan", "measure_speed", "plan_dataset", "plan_device",
           "plan_from_fingerprint", "plan_yaml", "round_patch", "torch_sees_gpu"]  # fmt: skip


def plan_device(device: str) -> Literal["cpu", "cuda"]:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cpu``/``cuda`` unchanged."""
    if device == "auto":
        return "cuda" if torch_sees_gpu() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    return device  # type: ignore[return-value]


def torch_sees_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def plan_dataset(
    manifest: str | Path,
    out: str | Path,
    device: str = "cpu",
    minutes_per_fold: float | None = None,
    progress: bool = True,
    cpu_bf16: bool | None = None,
    measure: bool = True,
) -> Plan:
    """Fingerprint the manifest's cross-validation pool, plan a config and write it to ``out``
    (YAML with the rules as a comment header) and ``fingerprint.json`` beside it (both atomic).

    ``device``: ``cpu``, ``cuda`` or ``auto`` (cuda when torch sees a GPU). ``measure``: time
    the planned model's training steps on this machine (:func:`measure_speed`; CPU 20-60 s, GPU
    10-30 s) and size the epochs (and, on a CPU, the threads) from that; without it, or when
    planning for a GPU this machine lacks, the assumed throughput of
    :func:`plan_from_fingerprint` (``cpu_bf16``: ``None`` = this machine's CPU). Raises
    ``ManifestError`` naming the manifest when no labelled case lies outside the test split or
    the pool mixes modalities, ``ConfigError`` for fewer than 2 patients.
    """
    from medseg import atomic
    from medseg.auto.fingerprint import compute_fingerprint
    from medseg.auto.folds import cv_pool
    from medseg.manifest import read_manifest

    resolved = plan_device(device)
    cases = read_manifest(manifest)
    pool = cv_pool(cases)
    if not pool:
        raise ManifestError(manifest, ["no labelled case outside the test split: planning needs labelled "
                                       "train/val/unassigned cases (test cases are never looked at)"])
    modalities = sorted({c.modality.upper() for c in pool})
    if len(modalities) > 1:
        raise ManifestError(manifest, [f"the pool mixes modalities {modalities}; plan one modality per manifest"])
    fingerprint = compute_fingerprint(pool, LabelConfig(), progress=progress)
    plan = plan_from_fingerprint(fingerprint, str(manifest), resolved, minutes_per_fold, cpu_bf16=cpu_bf16)
    if measure and (resolved == "cpu" or torch_sees_gpu()):
        try:
            measured = measure_speed(plan.config, pool, Path(manifest), resolved)
        except (RuntimeError, MedsegError) as exc:  # e.g. out of GPU memory: the assumed speed, said in the rules
            plan.rules.append(f"training throughput not measured ({type(exc).__name__}: {str(exc)[:200]}); "
                              "the epochs use the assumed throughput")
        else:
            plan = plan_from_fingerprint(fingerprint, str(manifest), resolved, minutes_per_fold, throughput=measured)
    out_path = Path(out)
    header = f"medseg plan {manifest} ({resolved}, fingerprint: {out_path.parent / 'fingerprint.json'})"
    atomic.write_json(out_path.parent / "fingerprint.json", fingerprint)
    atomic.write_text(out_path, plan_yaml(plan, header))
    return plan
