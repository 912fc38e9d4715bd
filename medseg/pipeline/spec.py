"""Pipeline files: :class:`PipelineSpec` (layout in :mod:`medseg.pipeline`), :func:`load_pipeline`
(with ``--set`` overrides for the config, the pipeline's fields and its stages' options) and the
run folder (:func:`choose_run_dir`)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from medseg.config import (
    Config,
    ConfigError,
    StrictModel,
    format_validation_error,
    parse_override,
)
from medseg.pipeline.stages import STAGES
from medseg.pipeline.state import STATE_FILE
from medseg.text_input import read_user_yaml


class StageSpec(StrictModel):
    """One entry of a pipeline file's ``stages``: a stage name of :data:`STAGES` and its options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_stage(cls, value: str) -> str:
        if value not in STAGES:
            raise ValueError(f"unknown stage {value!r}; the stages are {', '.join(STAGES)}")
        return value

    def parsed_options(self) -> StrictModel:
        return STAGES[self.name].options.model_validate(self.options)


class PipelineSpec(StrictModel):
    """A pipeline file (see the docstring of :mod:`medseg.pipeline`)."""

    name: str
    description: str = ""
    config: str | None = None
    manifest: str | None = None
    source: str | None = None
    checkpoint: str | None = None
    model: str | None = None
    config_overrides: list[str] = Field(default_factory=list)
    stages: list[StageSpec]

    @field_validator("checkpoint")
    @classmethod
    def _local_checkpoint(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"checkpoint file not found: {value}")
        return value

    @field_validator("model")
    @classmethod
    def _local_model(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"model folder not found: {value}")
        return value

    @model_validator(mode="after")
    def _data_given(self) -> PipelineSpec:
        imports = any(s.name == "import" for s in self.stages)
        pulls = any(s.name == "pacs_pull" for s in self.stages)  # writes the manifest from the PACS
        if self.manifest is None and not (imports and self.source) and not pulls:
            raise ValueError("set 'manifest:' (or --set pipeline.manifest=CSV), or an import stage with "
                             "--set pipeline.source=DATASET_FOLDER")
        return self

    @field_validator("stages", mode="before")
    @classmethod
    def _short_form(cls, value: Any) -> Any:
        """Accept ``- stats`` and ``- infer: {split: test}`` besides ``{name: ..., options: ...}``."""
        out = []
        for item in value or []:
            if isinstance(item, str):
                out.append({"name": item})
            elif isinstance(item, dict) and len(item) == 1 and "name" not in item:
                (name, options), = item.items()
                out.append({"name": name, "options": options or {}})
            else:
                out.append(item)
        return out

    @field_validator("stages")
    @classmethod
    def _valid_order(cls, stages: list[StageSpec]) -> list[StageSpec]:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"a stage appears twice: {names}")
        order = list(STAGES)
        if names != sorted(names, key=order.index):
            raise ValueError(f"stages must follow the order {order}; got {names}")
        for stage in stages:
            try:
                stage.parsed_options()
            except ValidationError as exc:
                raise ValueError(format_validation_error(f"stage {stage.name} options", exc)) from None
        return stages


PATH_FIELDS = ("config", "manifest", "source", "checkpoint", "model")


def _set_stage_option(tree: dict[str, Any], key: str, value: Any, path: str | Path) -> None:
    """``stage.<name>.<option>=value``: set one option of a stage of the pipeline file."""
    parts = key.split(".")
    if len(parts) != 3:
        raise ConfigError(f"override {key!r}: stage options are set as stage.<stage>.<option>=value")
    _, name, option = parts
    stages = tree.get("stages") or []
    for i, item in enumerate(stages):
        if item == name:
            stages[i] = {name: {option: value}}
            return
        if isinstance(item, dict) and name in item:
            item[name] = {**(item[name] or {}), option: value}
            return
    raise ConfigError(f"override {key!r}: {path} has no stage {name!r}")


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> tuple[PipelineSpec, Config, Path]:
    """Read a pipeline file and its config; ``overrides`` ``key=value`` go to the config, except
    ``pipeline.<field>=...`` (e.g. ``pipeline.manifest=hospital.csv``, ``pipeline.checkpoint=...``)
    and ``stage.<stage>.<option>=...`` (e.g. ``stage.plan.minutes_per_fold=10``).

    Paths in the pipeline file are resolved against its folder; paths given as overrides
    against the current directory. Returns (spec with absolute paths, config, pipeline path).
    """
    from medseg.config import load_config

    p = Path(path).resolve()
    tree = read_user_yaml(p, ConfigError, missing="pipeline file not found", name=path) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for key in PATH_FIELDS:
        if tree.get(key):
            tree[key] = str((p.parent / tree[key]).resolve())
    config_overrides = []
    for text in overrides or []:
        key, value = parse_override(text)
        if key.startswith("stage."):
            _set_stage_option(tree, key, value, path)
        elif key.startswith("pipeline."):
            field_name = key.split(".", 1)[1]
            tree[field_name] = str(Path(value).resolve()) if field_name in PATH_FIELDS and value else value
        else:
            config_overrides.append(text)
    tree["config_overrides"] = config_overrides  # kept: a plan stage re-applies them over its config
    synth = next((s for s in tree.get("stages", []) if isinstance(s, dict) and "synth" in s), None)
    if synth and isinstance(synth.get("synth"), dict) and synth["synth"].get("out"):
        synth["synth"]["out"] = str((p.parent / synth["synth"]["out"]).resolve())
    try:
        spec = PipelineSpec.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(path), exc)) from None
    cfg = load_config(spec.config, config_overrides)
    return spec, cfg, p


def choose_run_dir(spec: PipelineSpec, out: str | None, resume: bool, root: Path = Path("runs")) -> Path:
    """``out`` if given; with ``resume`` the newest run folder of this pipeline under
    ``root/<name>`` (one with a ``state.json``); else a new ``root/<name>/<timestamp>``."""
    if out:
        return Path(out).resolve()
    base = (root / spec.name).resolve()
    if resume:
        existing = sorted(p for p in base.glob("*") if (p / STATE_FILE).is_file())
        if existing:
            return existing[-1]
    return base / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
