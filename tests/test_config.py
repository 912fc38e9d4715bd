from __future__ import annotations

import pytest

from medseg.config import Config, load_config
from medseg.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["stats.axis=coronal", "data.labels.foreground=[1, 4]", "stats.n_bins=11"])
    assert cfg.stats.axis == "coronal" and cfg.data.labels.foreground == [1, 4] and cfg.stats.n_bins == 11
    assert isinstance(cfg, Config)


def test_unknown_key_names_file_and_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stats:\n  axsi: axial\n")
    with pytest.raises(ConfigError, match=r"c.yaml: stats.axsi: unknown key"):
        load_config(path)


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ConfigError, match="stats.axis"):
        load_config(None, ["stats.axis=diagonal"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stats: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["noequals"])
