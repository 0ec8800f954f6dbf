"""The validator config: the documented example parses, unknown keys and out-of-bounds values are errors."""
import re
from pathlib import Path

import pytest

from expertmesh.validator.config import ConfigError, load_config, parse_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "validator.md"


def example_toml() -> str:
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert blocks, "docs/validator.md has no ```toml example"
    return blocks[0]


def test_documented_example_parses_and_resolves_paths_next_to_the_file(tmp_path):
    (tmp_path / "validator.toml").write_text(example_toml())
    cfg = load_config(tmp_path / "validator.toml")
    assert cfg.state_dir == tmp_path / "validator-state"
    assert cfg.merge.outer_lr == 1.0 and cfg.merge.momentum == 0.0 and cfg.merge.nesterov
    assert cfg.scoring.copy_cosine == 0.98
    assert all(p.path.is_absolute() for p in cfg.datasets.preload)


def test_defaults_are_the_measured_ones():
    cfg = parse_config({})  # the outer step's: docs/BENCHMARKS.md "outer step"
    assert (cfg.merge.outer_lr, cfg.merge.momentum, cfg.scoring.copy_cosine) == (1.0, 0.0, 0.98)
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 0 and not cfg.dht.enabled


@pytest.mark.parametrize("doc, field", [
    ({"scoring": {"copy_cosin": 0.9}}, "scoring.copy_cosin"),
    ({"rounds": {"min_submissions": 0}}, "rounds.min_submissions"),
    ({"merge": {"momentum": 1.0}}, "merge.momentum"),
    ({"server": {"port": 70000}}, "server.port"),
    ({"surprise": 1}, "surprise"),
    ({"scoring": {"domains": ["Math!"]}}, "domain names"),
    ({"rounds": {"min_submissions": 5, "max_submissions": 2}}, "max_submissions"),
])
def test_bad_values_name_the_field(doc, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        parse_config(doc)


def test_cli_overrides_win_and_none_means_not_given(tmp_path):
    (tmp_path / "v.toml").write_text('[server]\nport = 5000\n[rounds]\nduration_s = 60\n')
    cfg = load_config(tmp_path / "v.toml", {"server.port": 0, "rounds.duration_s": None, "metrics.enabled": True})
    assert cfg.server.port == 0 and cfg.rounds.duration_s == 60 and cfg.metrics.enabled


def test_file_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
