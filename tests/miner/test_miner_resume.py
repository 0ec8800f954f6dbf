"""kill -9 in the middle of the inner loop: the restarted miner resumes and submits exactly once for that round.

Real parts: the miner is the real CLI in a subprocess, the validator side a real gRPC server
(the real validator's parts, validatorparts.py) on 127.0.0.1:0, the model the shipped one. The resumed run's delta must equal an
uninterrupted run's (same steps, same data, same selection), and a third start, after the
submission, must wait for the next round without sending anything, then stop cleanly on SIGTERM.
"""
from __future__ import annotations

import json
import signal

import pytest
import torch

from expertmesh.node.miner.config import TrainSection
from expertmesh.node.miner.inner import run_inner
from expertmesh.node.miner.metrics import MinerMetrics
from expertmesh.node.miner.progress import Progress
from expertmesh.node.moe import load_model
from expertmesh.node.select import read_esft
from expertmesh.protocol.codec import CodecConfig, DeltaMeta, encode_delta, decode_delta
from safetensors.torch import load_file

from procs import Child

pytestmark = pytest.mark.slow
STEPS, EVERY = 8, 2


@pytest.fixture
def miner_config(tmp_path, validator, key_file, write_gsm8k):
    data = write_gsm8k(tmp_path / "math.jsonl", 400)
    path = tmp_path / "miner.toml"
    path.write_text(f"""
domain = "math"
key = "{key_file}"
state_dir = "state"
[validator]
address = "{validator.address}"
[data]
path = "{data}"
template = "{{question}}\\n{{answer}}"
[select]
profile_tokens = 4096
[train]
steps = {STEPS}
batch_size = 4
checkpoint_every = {EVERY}
threads = 1
[loop]
poll_s = 0.5
progress_every_s = 0
""")
    return path


def test_sigkill_mid_inner_loop_resumes_and_submits_once(validator, miner_config, tmp_path):
    validator.register(tmp_path / "math.jsonl")  # the miner's own file: math is scored here
    r = validator.node.book.current().round  # the round opened with math scored
    first = Child("miner", "run", "--config", str(miner_config))
    try:
        first.wait_for(f"train step {EVERY * 2 + 1}/{STEPS}", timeout=240)
    finally:
        first.kill(signal.SIGKILL)
    state = tmp_path / "state" / "work" / f"r{r}-v0" / "inner"
    assert json.loads((state / "state.json").read_text())["step"] == EVERY * 2
    assert not validator.deltas(r) and validator.admit_delta_calls == 0

    second = Child("miner", "run", "--config", str(miner_config), "--max-rounds", "1")
    assert second.wait(240) == 0, second.output()
    assert f"resuming the inner loop from step {EVERY * 2}/{STEPS}" in second.output()
    assert "train step 1/" not in second.output()  # nothing before the checkpoint was redone
    assert len(validator.deltas(r)) == 1 and validator.admit_delta_calls == 1
    book = json.loads((tmp_path / "state" / "submissions.json").read_text())
    assert book[str(r)]["outcome"] == "received"

    # Resume is checked by equality: an uninterrupted inner loop gives the same submission.
    (sub, received), = validator.deltas(r)
    cache = tmp_path / "state" / "cache"
    moe, _ = load_model(next((tmp_path / "state" / "models").glob("v0-*")))
    selection = read_esft(json.loads(next(cache.glob("selection-*.json")).read_text())["experts"], moe)
    rows = load_file(next(cache.glob("rows-*.safetensors")))["rows"]
    train = TrainSection(steps=STEPS, batch_size=4, checkpoint_every=STEPS)
    # One torch thread (conftest), as the miner ran (train.threads = 1): the same reduction order.
    result = run_inner(moe, selection, rows, train, r, tmp_path / "fresh", Progress(every_s=1e9), MinerMetrics(),
                       lambda: False)
    enc = encode_delta(result.delta, DeltaMeta(0, result.tokens, "0" * 64), CodecConfig())
    expected = decode_delta(enc.payload, moe.expert_shapes()).tensors
    assert expected.keys() == received.keys()
    diff = max((expected[k] - received[k]).abs().max().item() for k in expected)
    assert all(torch.equal(expected[k], received[k]) for k in expected), diff

    # A third start: that round is done, so it waits without sending, and SIGTERM stops it cleanly.
    third = Child("miner", "run", "--config", str(miner_config))
    try:
        third.wait_for(f"round {r}: received; waiting for the next round", timeout=120)
        third.kill(signal.SIGTERM)
        assert third.wait(60) == 0
    finally:
        third.kill()
    assert "stopped" in third.output().splitlines()[-1]
    assert validator.admit_delta_calls == 1 and len(validator.deltas(r)) == 1
