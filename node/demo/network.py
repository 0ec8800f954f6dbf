"""Bringing up the demo network: keys, config files, and the children in order.

bootstrap DHT peer → validator (shipped model as version 0, announcing on the DHT) → each domain
registered through the real `expertmesh dataset submit` → miners, which find the validator through
the DHT and train on the train split they fetch from it. Everything listens on 127.0.0.1, port 0.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from expertmesh.node.demo.heldout import DomainSource
from expertmesh.node.miner.config import SelectSection, TrainSection
from expertmesh.node.demo.procs import Child, Supervisor
from expertmesh.protocol import identity
from expertmesh.protocol.files import atomic_write
from expertmesh.protocol.heldout import load_or_create_key

DOMAIN_ORDER = ("math", "literature", "code")


@dataclass(frozen=True)
class DemoSettings:
    """The demo's knobs. Training uses the miner's own defaults (tuned so that two rounds improve every
    trained domain); only what keeps many processes on a small CPU quick differs."""

    steps: int = TrainSection().steps  # H inner steps per round
    lr: float = TrainSection().lr
    p: float = SelectSection().p
    batch_size: int = TrainSection().batch_size
    max_tokens: int = 300_000  # training tokens each miner tokenizes from its split (more is unused in 2-3 rounds)
    eval_tokens: int = 16_384  # validator scoring budget per domain; the demo passes its own


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def write_toml(path: Path, doc: dict) -> Path:
    """A TOML file from top-level keys and one level of sections (all the demo needs)."""
    lines = [f"{k} = {_toml(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for section, fields in doc.items():
        if isinstance(fields, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {_toml(v)}" for k, v in fields.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def new_key(path: Path) -> str:
    key = identity.generate_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    identity.save_key(key, path, overwrite=True)
    return identity.key_id(identity.public_bytes(key))


def start_bootstrap(sup: Supervisor) -> list[str]:
    child = sup.start("bootstrap", "bootstrap")
    first = sup.wait_line(child, "/ip4/", timeout_s=120)
    return [first] + [l for l in child.log.read_text().splitlines() if l.startswith("/ip4/") and l != first]


def heldout_key_path(run_dir: Path) -> Path:
    """The demo validator's held-out key (the demo, as its operator, writes it and measures with it)."""
    return run_dir / "validator" / "heldout.key"


# The demo's validator keeps a fixed, published held-out key, so that every demo run and benchmark scores
# on the same records and their figures compare. A real validator's key is random and secret.
DEMO_HELDOUT_KEY = hashlib.sha256(b"expertmesh demo held-out key: public, for reproducible figures only").digest()


def write_demo_heldout_key(run_dir: Path) -> bytes:
    path = heldout_key_path(run_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, DEMO_HELDOUT_KEY)
        path.chmod(0o600)
    return load_or_create_key(path)


def start_validator(sup: Supervisor, run_dir: Path, peers: list[str], n_miners: int, keep_versions: int,
                    s: DemoSettings, domains: list[str]) -> tuple[Child, str, Path]:
    state = run_dir / "validator" / "state"
    write_demo_heldout_key(run_dir)
    doc = {"state_dir": str(state),
           "server": {"host": "127.0.0.1", "port": 0},
           # A round closes as soon as every miner has submitted; the deadline only matters if one fails.
           "rounds": {"duration_s": 1800, "min_submissions": 1, "max_submissions": n_miners, "poll_s": 0.5},
           "scoring": {"domains": domains, "eval_tokens": s.eval_tokens, "batch_size": 16},
           "datasets": {"heldout_key": str(heldout_key_path(run_dir))},
           "publish": {"keep_versions": keep_versions},
           "dht": {"enabled": True, "initial_peers": peers, "announce_every_s": 2},
           "log": {"format": "text"}}
    config = write_toml(run_dir / "validator" / "validator.toml", doc)
    child = sup.start("validator", "validator", "run", "--config", str(config))
    address = sup.wait_line(child, "expertmesh-validator: serving on ", timeout_s=300).split()[-1]
    return child, address, state


def register_domains(sup: Supervisor, run_dir: Path, address: str, sources: list[DomainSource]) -> None:
    """Each domain through the real CLI, concurrently; the demo goes on only when all are registered."""
    key = run_dir / "keys" / "submitter.key"
    new_key(key)
    children = [sup.start(f"dataset-submit-{src.domain}", "dataset", "submit", str(src.path), "--domain", src.domain,
                          "--validator", address, "--key", str(key), "--cache-dir", str(run_dir / "cache"),
                          *src.submit_flags(), expect_exit=True) for src in sources]
    for child in children:
        sup.wait_exit(child, timeout_s=600)


def start_miner(sup: Supervisor, run_dir: Path, index: int, domain: str, peers: list[str], s: DemoSettings,
                metrics_port: int = 0) -> tuple[Child, str, Path]:
    name = f"miner-{index}-{domain}"
    home = run_dir / name
    key_id = new_key(home / "miner.key")
    doc = {"domain": domain, "key": "miner.key", "state_dir": "state",
           "validator": {"initial_peers": peers},
           "data": {"max_tokens": s.max_tokens},
           "select": {"p": s.p},
           "train": {"steps": s.steps, "lr": s.lr, "batch_size": s.batch_size, "seed": index, "threads": 1,
                     "checkpoint_every": 10},
           "loop": {"poll_s": 1.0, "backoff_max_s": 5.0, "progress_every_s": 10.0},
           "metrics": {"port": metrics_port}}
    config = write_toml(home / "miner.toml", doc)
    return sup.start(name, "miner", "run", "--config", str(config)), key_id, home / "state"


def miner_domains(n: int) -> list[str]:
    return [DOMAIN_ORDER[i % len(DOMAIN_ORDER)] for i in range(n)]
