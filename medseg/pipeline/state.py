"""A pipeline run's state: what stages share in memory (:class:`RunContext`) and what the run
folder keeps between runs.

On disk, in the run folder: ``state.json`` (per stage: input fingerprint, output fingerprint,
status, seconds, finish time, number of runs, and what :attr:`Stage.remember` adds) and
``failures_by_stage.json`` (per stage: the failed cases it recorded, so that a skipped stage's
failures still reach the run's ``failures.csv``).

A stage's input fingerprint (:func:`stage_fingerprint`) covers its options, the resolved config,
the pipeline's checkpoint/model, the manifest's bytes, the identity of the files the manifest
names (:func:`manifest_files_identity`: a scan or label replaced in place is a new input) and
the output fingerprints of the stages before it; its output fingerprint
(:func:`output_fingerprint`) covers the names, sizes and modification times of the files in its
output folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg import atomic
from medseg.config import Config
from medseg.errors import MedsegError
from medseg.input_identity import input_identity
from medseg.manifest import Case, read_manifest
from medseg.outputs import MODEL_RECORD

STATE_FILE = "state.json"
FAILURES_BY_STAGE_FILE = "failures_by_stage.json"


@dataclass
class RunContext:
    """What stages share: the run folder, the pipeline's name, dataset folder (``source``) and
    config overrides, the resolved config, the manifest and the results so far (checkpoint,
    model folder, failed cases as ``{"case_id", "stage", "error"}`` records)."""

    run_dir: Path
    name: str
    cfg: Config
    manifest: Path
    config_overrides: list[str] = field(default_factory=list)
    source: str | None = None
    progress: bool = True
    checkpoint: Path | None = None
    model_dir: Path | None = None
    failures: list[dict] = field(default_factory=list)

    def cases(self, split: str | None = None) -> list[Case]:
        cases = read_manifest(self.manifest)
        return [c for c in cases if split is None or c.split == split]

    def stage_dir(self, name: str) -> Path:
        d = self.run_dir / name
        d.mkdir(parents=True, exist_ok=True)
        return d


def hash_text(*parts: Any) -> str:
    """16 hex digits of the SHA-256 of ``parts`` as JSON (keys sorted)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def output_fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of every file under ``folder``."""
    if not folder.exists():
        return "missing"
    entries = sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                     for f in folder.rglob("*") if f.is_file() and ".partial" not in f.name)
    return hash_text(entries)


def stage_fingerprint(
    name: str,
    options: dict[str, Any],
    config: dict[str, Any],
    checkpoint: str | None,
    model: str | None,
    source: str | None,
    manifest_bytes: bytes,
    upstream: str,
    manifest_files: list[Any] | None = None,
) -> str:
    """A stage's input fingerprint: its ``options`` and the ``config`` (both as JSON), the
    pipeline's ``checkpoint``/``model`` (their paths and file identities, :func:`file_identity`:
    a model retrained in place is a new input), ``source`` (``None`` for stages that do not read
    it), the manifest's bytes (``b""`` for stages that do not read it), the identity of the files
    it names (``manifest_files``, :func:`manifest_files_identity`; ``None`` for stages that do not
    read the manifest) and ``upstream`` (the output fingerprints of the stages before it,
    chained with :func:`hash_text`)."""
    model_files = [file_identity(Path(checkpoint))] if checkpoint else []
    if model:
        model_files.append(file_identity(Path(model) / MODEL_RECORD))
    return hash_text(name, options, config, checkpoint, model, model_files, source,
                     hashlib.sha256(manifest_bytes).hexdigest(), upstream, manifest_files)


def manifest_files_identity(manifest: Path) -> list[Any]:
    """``[case_id, {channel: identity}, label identity]`` per row of ``manifest``: every image
    and label file it names (:func:`medseg.input_identity.input_identity`: size, mtime, a hash of
    the first 64 KiB; a DICOM series folder by its listing), so a stage reading them runs again
    when one is replaced in place. A manifest that cannot be read gives ``["unreadable: ..."]``
    (the stage then fails reading it itself)."""
    try:
        cases = read_manifest(manifest, check_files=False)
    except (MedsegError, OSError) as exc:
        return [f"unreadable: {exc}"]
    return [[c.case_id, {ch: input_identity(p) for ch, p in c.images.items()},
             input_identity(c.label) if c.label is not None else None] for c in cases]


def file_identity(path: Path) -> list[Any]:
    """(size, mtime in ns) of ``path``; ``None`` values when it does not exist. A model folder is
    named by its ``model.json``, which lists every checkpoint's sha256 and is rewritten with them."""
    try:
        stat = path.stat()
    except OSError:
        return [None, None]
    return [stat.st_size, stat.st_mtime_ns]


def read_state(run_dir: Path) -> dict[str, Any]:
    """``state.json`` of ``run_dir`` as ``{stage: record}`` (empty for a new run)."""
    path = run_dir / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    atomic.write_json(run_dir / STATE_FILE, state)


def read_failures_by_stage(run_dir: Path) -> dict[str, list[dict]]:
    """``failures_by_stage.json`` of ``run_dir`` as ``{stage: [failure record, ...]}``."""
    path = run_dir / FAILURES_BY_STAGE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_failures_by_stage(run_dir: Path, failures: dict[str, list[dict]]) -> None:
    atomic.write_json(run_dir / FAILURES_BY_STAGE_FILE, failures)
