"""The miner's typed config: the README's example parses, mistakes are one line naming the field, exit code 2."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from expertmesh.node.miner.config import ConfigError, load_config, parse_config

README = Path(__file__).resolve().parents[2] / "README.md"
MINIMAL = {"domain": "math", "key": "miner.key", "validator": {"address": "127.0.0.1:5000"}}


def readme_miner_toml() -> str:
    block = re.search(r"A complete `miner.toml`.*?```toml\n(.*?)```", README.read_text(), re.S)
    assert block, "README lost its complete miner.toml example"
    return block.group(1)


def test_readme_example_is_a_valid_config_with_the_defaults(tmp_path):
    path = tmp_path / "miner.toml"
    path.write_text(readme_miner_toml())
    cfg = load_config(path)
    assert cfg.key == tmp_path / "miner.key" and cfg.state_dir == tmp_path / "miner-state"  # relative to the file
    assert cfg.validator.initial_peers and not cfg.validator.address
    # The example shows the defaults: every value it sets equals the model's own default.
    doc = tomllib.loads(readme_miner_toml())
    default = parse_config({"domain": "math", "key": "k", "validator": {"initial_peers": ["x"]}})
    for section, fields in doc.items():
        if isinstance(fields, dict) and section != "validator":
            for name, value in fields.items():
                assert getattr(getattr(default, section), name) == value, (section, name)


@pytest.mark.parametrize("doc, where", [
    ({**MINIMAL, "tran": {"steps": 3}}, "tran"),
    ({**MINIMAL, "train": {"stpes": 3}}, "train.stpes"),
    ({**MINIMAL, "train": {"steps": 0}}, "train.steps"),
    ({**MINIMAL, "select": {"p": 1.5}}, "select.p"),
    ({**MINIMAL, "codec": {"codec": "zip"}}, "codec.codec"),
    ({**MINIMAL, "domain": "Math!"}, "domain"),
    ({**MINIMAL, "validator": {}}, "initial_peers"),
    ({**MINIMAL, "validator": {"address": "no-port"}}, "HOST:PORT"),
    ({**MINIMAL, "data": {"text_field": "a", "template": "{b}"}}, "not both"),
    ({**MINIMAL, "loop": {"backoff_min_s": 9, "backoff_max_s": 1}}, "backoff_min_s"),
    ({"domain": "math", "validator": {"address": "h:1"}}, "key"),
])
def test_mistakes_name_the_field(doc, where):
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert where in str(err.value) and "\n" not in str(err.value)


def test_overrides_win_and_unset_flags_do_not(tmp_path):
    cfg = parse_config(MINIMAL, {"train.steps": 7, "validator.address": None, "domain": "code"})
    assert (cfg.train.steps, cfg.validator.address, cfg.domain) == (7, "127.0.0.1:5000", "code")


def test_cli_bad_config_is_one_line_and_exit_2(tmp_path, cli):
    path = tmp_path / "miner.toml"
    path.write_text('domain = "math"\nkey = "k"\n[validator]\naddress = "127.0.0.1:1"\n[train]\nsteps = -1\n')
    r = cli("miner", "run", "--config", str(path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "train.steps" in r.stderr, r.stderr
    r = cli("miner", "run", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "config file not found" in r.stderr and "Traceback" not in r.stderr
    path.write_text('domain = "math"\nkey = "nokey"\n[validator]\naddress = "127.0.0.1:1"\n')
    r = cli("miner", "run", "--config", str(path))  # a missing key file is fatal too, before any network
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "nokey" in r.stderr, r.stderr


def test_readme_validator_example_is_a_valid_validator_config(tmp_path):
    from expertmesh.validator.config import load_config as load_validator_config

    block = re.search(r"A complete `validator.toml`.*?```toml\n(.*?)```", README.read_text(), re.S)
    assert block, "README lost its complete validator.toml example"
    (tmp_path / "validator.toml").write_text(block.group(1))
    cfg = load_validator_config(tmp_path / "validator.toml")
    assert cfg.dht.enabled and cfg.server.port == 50051 and cfg.state_dir == tmp_path / "validator-state"


@pytest.mark.parametrize("metrics, served, port", [({}, False, 0), ({"port": 9100}, True, 9100),
                                                   ({"enabled": True}, True, 0)])
def test_the_metrics_section_means_the_same_on_miner_and_validator(metrics, served, port):
    from expertmesh.validator.config import parse_config as parse_validator

    for cfg in (parse_config({**MINIMAL, "metrics": metrics}), parse_validator({"metrics": metrics})):
        assert (cfg.metrics.enabled, cfg.metrics.port) == (served, port)
