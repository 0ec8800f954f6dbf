"""Local state shared by processes: one cache filled by many at once, one owner per miner state directory.

Real parts only: CheckpointCache.ensure in real child processes against a real gRPC server, the real
miner CLI, kill -9 by pid.
"""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from procs import Child

pytestmark = pytest.mark.slow
CHILD = Path(__file__).with_name("cachechild.py")


class CacheChild(Child):
    def __init__(self, root: Path, validator, *extra: str):
        sha = validator.current_round().model_sha256.hex()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(CHILD), str(root), validator.address, "0", sha, *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self._start_pump()


def _fetched(child: Child) -> list[str]:
    return [l.split()[1] for l in child.lines if l.startswith("fetched ")]


def test_many_processes_fill_one_cache_while_one_is_killed_mid_download(validator, tmp_path):
    root = tmp_path / "cache"
    listed = validator.listed(0)
    victim = CacheChild(root, validator, "--stall", "model.safetensors")
    others: list[CacheChild] = []
    try:
        victim.wait_for("stalled model.safetensors", timeout=120)
        part = next(root.glob(".partial-v0-*"))
        assert list(part.glob("upload-*.part"))  # a real half-written file of the victim's is on disk
        others = [CacheChild(root, validator) for _ in range(4)]
        victim.kill(signal.SIGKILL)  # while the others wait for the version it was filling
        codes = [c.wait(180) for c in others]
    finally:
        for c in [victim, *others]:
            c.kill()
    assert codes == [0] * len(others), "\n\n".join(c.output() for c in others)
    dirs = {c.lines[-1].split(maxsplit=1)[1] for c in others}
    assert len(dirs) == 1, dirs
    final = Path(dirs.pop())
    for name, (sha, _) in listed.items():  # every survivor was handed this one verified copy
        assert hashlib.sha256((final / name).read_bytes()).hexdigest() == sha, name
    assert [d.name for d in root.iterdir() if not d.name.startswith(".")] == [final.name]
    assert not list(root.glob(".partial-*")) and not list(final.rglob("upload-*.part"))
    # Each file was downloaded once: what the victim finished was kept, the rest fetched by one survivor.
    survivors = [n for c in others for n in _fetched(c)]
    assert sorted(survivors + _fetched(victim)) == sorted(listed), (survivors, _fetched(victim))


def test_a_version_in_use_is_never_pruned(validator, tmp_path):
    from expertmesh.node.fetch import CheckpointCache
    from expertmesh.protocol.client import ValidatorClient

    root = tmp_path / "cache"
    assert validator.publish_copy() == 1
    with ValidatorClient(validator.address) as client:
        user = CheckpointCache(root, keep=1)  # flock locks are per open file: two objects act as two processes
        v0 = user.ensure(client, 0, validator.version(0)[1])
        v1 = CheckpointCache(root, keep=1).ensure(client, 1, validator.version(1)[1])  # keep=1: v0 would go
        assert v0.is_dir() and v1.is_dir()
        user.release()
        assert CheckpointCache(root, keep=1).ensure(client, 1, validator.version(1)[1]) == v1
        assert not v0.exists() and v1.is_dir()
        assert sorted(p.name for p in (root / ".locks").iterdir()) == [f"{v1.name}.lock"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_second_miner_on_a_held_state_directory_exits_2_naming_the_holder(tmp_path, key_file, write_gsm8k, cli):
    data = write_gsm8k(tmp_path / "math.jsonl", 50)
    config = tmp_path / "miner.toml"  # no validator listens there: the miner retries, holding its state
    config.write_text(f"""
domain = "math"
key = "{key_file}"
state_dir = "state"
[validator]
address = "127.0.0.1:{_free_port()}"
[data]
path = "{data}"
template = "{{question}}\\n{{answer}}"
[loop]
backoff_min_s = 0.5
backoff_max_s = 1
progress_every_s = 0
""")
    state = tmp_path / "state"
    first = Child("miner", "run", "--config", str(config))
    try:
        first.wait_for("cannot take part", timeout=120)
        before = sorted(p.relative_to(state) for p in state.rglob("*"))
        second = cli("miner", "run", "--config", str(config), timeout=120)
        assert second.returncode == 2, second.stderr
        line, = second.stderr.strip().splitlines()
        assert str(state) in line and f"process {first.proc.pid}" in line, line
        assert sorted(p.relative_to(state) for p in state.rglob("*")) == before
        first.wait_for("cannot take part", timeout=60)  # the first one carries on
        first.kill(signal.SIGKILL)
        third = Child("miner", "run", "--config", str(config))  # kill -9 left no lock behind
        try:
            third.wait_for("cannot take part", timeout=120)
        finally:
            third.kill()
    finally:
        first.kill()
