"""Processes that share local state: many `dataset submit` runs on one cache, one validator per state directory.

Real parts only: `expertmesh validator run` in a child process (with a real DHT peer, so hivemind's
forked DHT process is part of it), the real CLI for everything else, kill -9 by pid.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from expertmesh.protocol import identity
from expertmesh.protocol.client import ValidatorClient
from valhelpers import Daemon, config_doc, wait_until, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _stat(pid: int) -> list[str] | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()  # [state, ppid, ...]
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and (_stat(int(d.name)) or ["", ""])[1] == str(pid)]


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _submit(path, address, key, cache) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "expertmesh", "dataset", "submit", str(path), "--domain", "math",
                             "--validator", address, "--key", str(key), "--cache-dir", str(cache)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_six_dataset_submits_at_once_on_one_cache_all_succeed(tmp_path, math_texts):
    daemon = Daemon(write_config(tmp_path / "validator.toml", config_doc(tmp_path / "state")), tmp_path / "v.log")
    try:
        keys = []
        for i in range(6):
            keys.append(tmp_path / f"k{i}.key")
            identity.save_key(identity.generate_key(), keys[-1])
        for trial in range(3):  # a cold cache each time: the race is in filling it
            cache = tmp_path / f"cache{trial}"
            procs = []
            for i in range(6):
                part = math_texts[(trial * 6 + i) * 110:(trial * 6 + i + 1) * 110]
                path = tmp_path / f"math-{trial}-{i}.jsonl"
                path.write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
                procs.append(_submit(path, daemon.address, keys[i], cache))
            results = [(p.wait(300), *p.communicate()) for p in procs]
            assert [r[0] for r in results] == [0] * 6, (trial, [r[2] for r in results if r[0]])
            assert all("registered:" in out for _, out, _ in results)
            versions = [d for d in (cache / "tokenizers").iterdir() if not d.name.startswith(".")]
            assert len(versions) == 1 and not list((cache / "tokenizers").glob(".partial-*")), versions
        with ValidatorClient(daemon.address) as client:
            assert len(client.list_datasets("math")) == 18
    finally:
        daemon.cleanup()


def test_a_second_validator_on_a_held_state_directory_exits_2_and_kill_9_frees_it(tmp_path, cli):
    from expertmesh.protocol.discovery import DiscoveryConfig, start_dht, visible_maddrs

    peer = start_dht(DiscoveryConfig())
    state = tmp_path / "state"
    doc = config_doc(state, dht={"enabled": True, "initial_peers": visible_maddrs(peer), "announce_every_s": 2})
    config = write_config(tmp_path / "validator.toml", doc)
    first = Daemon(config, tmp_path / "first.log")
    second = None
    try:
        first.wait_for("joined the DHT")  # hivemind has forked its DHT process by now
        before = {p: p.stat().st_mtime_ns for p in state.rglob("*") if p.is_file() and "ledger" not in p.name}
        r = cli("validator", "run", "--config", str(config), timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        line, = r.stderr.strip().splitlines()
        assert str(state) in line and f"process {first.proc.pid}" in line, line
        assert {p: p.stat().st_mtime_ns for p in before} == before  # the refused one touched nothing
        with ValidatorClient(first.address) as client:
            assert client.get_round().round == 1  # the first keeps serving
        children = _children(first.proc.pid)
        assert children  # hivemind's DHT process
        first.kill()
        wait_until(lambda: not any(map(_alive, children)), 60, "the DHT process to die with its validator")
        second = Daemon(config, tmp_path / "second.log")  # no stale lock, even with the DHT child around
        with ValidatorClient(second.address) as client:
            assert client.get_round().round == 1
    finally:
        first.cleanup()
        if second is not None:
            second.cleanup()
        peer.shutdown()
