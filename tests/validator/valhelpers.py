"""Helpers for the validator tests: configs, real deltas, signed submissions, a validator subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from expertmesh.protocol.experts import ExpertSet

REPO = Path(__file__).resolve().parents[2]
TRAIN_STEPS, TRAIN_LR, TRAIN_BATCH = 20, 1e-3, 4
TEST_POW_BITS = 8  # a few hundred hashes per commitment; the default (22) is tried in tests/adversarial/test_identity.py
FAST_SCORING = {"eval_tokens": 2048, "batch_size": 8, "open_domains": True}  # lean: other work shares the CPUs


@dataclass(frozen=True)
class Trained:
    delta: dict[str, torch.Tensor]
    selection: ExpertSet
    tokens: int


def train_delta(texts: list[str], steps: int = TRAIN_STEPS, seed: int = 0, drop_public_heldout: bool = True) -> Trained:
    """What a miner does: profile routing on its data, select experts (ESFT), train them, take the delta.

    The texts' public held-out part (protocol.heldout without a key) is left out unless told otherwise."""
    from expertmesh.protocol.heldout import DEFAULT_FRACTION, split
    from expertmesh.node.jobs import data_rows
    from expertmesh.node.moe import load_model
    from expertmesh.node.paths import DEFAULT_MODEL
    from expertmesh.node.profile import RoutingProfile, batches
    from expertmesh.node.select import select_experts
    from expertmesh.node.train import SelectiveExperts, TrainConfig, Trainer

    torch.manual_seed(seed)
    moe, tokenizer = load_model(DEFAULT_MODEL)
    train = split(texts, DEFAULT_FRACTION)[0] if drop_public_heldout else list(texts)
    rows = data_rows(tokenizer, train, 64 * 256)
    selection = select_experts(RoutingProfile(moe).run(batches(rows[:16], 8)).to_json(), "token", p=0.3)
    sel = SelectiveExperts(moe, selection)
    Trainer(sel, rows, TrainConfig(steps=steps, lr=TRAIN_LR, batch_size=TRAIN_BATCH, seed=seed)).train()
    return Trained(sel.delta(), selection, steps * TRAIN_BATCH * 256)


def config_doc(state_dir: Path, **sections) -> dict:
    doc = {"state_dir": str(state_dir), "threads": 1,
           "rounds": {"duration_s": 3600, "max_submissions": 3, "poll_s": 0.1},
           "scoring": dict(FAST_SCORING), "log": {"format": "text"},
           "admission": {"pow_bits": TEST_POW_BITS}}
    for name, values in sections.items():
        doc[name] = {**doc.get(name, {}), **values} if isinstance(values, dict) else values
    return doc


def build_test_node(state_dir: Path, **sections):
    from expertmesh.validator.config import parse_config
    from expertmesh.validator.daemon import build_node
    from expertmesh.validator.scheduler import PhaseHooks

    return build_node(parse_config(config_doc(state_dir, **sections)), PhaseHooks())


def encode(delta: dict[str, torch.Tensor], version: int, tokens: int = 20_480, codec: str = "int8") -> bytes:
    from expertmesh.protocol.codec import CodecConfig, DeltaMeta, encode_delta

    return encode_delta(delta, DeltaMeta(version, tokens, "ab" * 32), CodecConfig(codec, block=256)).payload


def negated(delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: -v for k, v in delta.items()}


def submit(client, key, payload: bytes, domain: str = "math", commit: bool = True, **overrides):
    """Commit to `payload` (with the round's proof of work), sign it for the open round (or the given
    overrides) and send it: what a miner does."""
    from expertmesh.protocol.client import sign_commit, sign_upload

    info = client.get_round()
    fields = dict(model_version=info.model_version, model_sha256=info.model_sha256, round=info.round, domain=domain)
    fields.update(overrides)
    if commit:
        client.commit_delta(sign_commit(key, payload, **fields, pow_bits=info.pow_bits))
    envelope = sign_upload("delta", key, payload, **fields)
    return client.submit_delta(payload, envelope), envelope


def register(client, key, payload_path: Path, domain: str = "math", name: str = "gsm8k-part"):
    from expertmesh.protocol.client import sign_upload

    info = client.get_round()
    envelope = sign_upload("dataset", key, payload_path, model_version=info.model_version,
                           model_sha256=info.model_sha256, round=info.round, domain=domain, label=name)
    return client.register_dataset(payload_path, envelope)


def run_until(node, predicate, max_steps: int = 50):
    """Drive the scheduler by hand (no threads, no clocks) until `predicate(node)` holds."""
    for _ in range(max_steps):
        if predicate(node):
            return
        node.scheduler.step()
    raise AssertionError(f"not reached in {max_steps} steps; round is {node.book.current()}")


class Daemon:
    """`python -m expertmesh validator run` as a child process; stopped by pid, never by name."""

    def __init__(self, config: Path, log: Path, env: dict | None = None):
        self.log_path = log
        self._offset = log.stat().st_size if log.exists() else 0  # earlier runs' lines do not count
        self._log = open(log, "ab")
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "expertmesh", "validator", "run", "--config", str(config)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
        self.address = self.wait_for("expertmesh-validator: serving on ").split()[-1]

    def wait_for(self, marker: str, timeout_s: float = 120.0) -> str:
        """The log line holding `marker` (written after this daemon started), or fail with the log's tail."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.text().splitlines()[::-1]:
                if marker in line:
                    return line
            if self.proc.poll() is not None:
                raise AssertionError(f"validator exited {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"no {marker!r} within {timeout_s}s:\n{self.tail()}")

    def text(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def terminate(self, timeout_s: float = 60.0) -> int:
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self._log.close()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.kill()


def ledger_rows(state_dir: Path, sql: str, args: tuple = ()) -> list[dict]:
    """Rows of the (possibly running) validator's ledger, opened read-only (WAL allows a live reader)."""
    import sqlite3

    db = sqlite3.connect(f"file:{state_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(sql, args)]
    finally:
        db.close()


def wait_until(predicate, timeout_s: float, what: str, daemon: "Daemon | None" = None, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if daemon is not None and daemon.proc.poll() is not None:
            raise AssertionError(f"validator exited {daemon.proc.returncode} while waiting for {what}:\n{daemon.tail()}")
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}" + (f":\n{daemon.tail()}" if daemon else ""))


def write_config(path: Path, doc: dict) -> Path:
    """A validator.toml from a dict of sections (only the value types the tests use)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = [f"{k} = {value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for section, fields in doc.items():
        if isinstance(fields, dict):
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in fields.items() if not isinstance(v, list) or not v
                      or not isinstance(v[0], dict)]
            for k, items in fields.items():
                if isinstance(items, list) and items and isinstance(items[0], dict):
                    for item in items:
                        lines.append(f"\n[[{section}.{k}]]")
                        lines += [f"{kk} = {value(vv)}" for kk, vv in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Other work shares this machine's cores; two spinning OpenMP threads then stall each other
    (a 15-step train went from 0.1 s to 30 s). The validators under test get `threads = 1` likewise."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
