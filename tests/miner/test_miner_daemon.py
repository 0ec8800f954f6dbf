"""The miner's loop against a real gRPC server: why it cannot take part (one line, backoff), refusals
recorded once per round, the next round trained, error feedback, idempotent resends, metrics."""
from __future__ import annotations

import io
import json
import socket
import threading
import time
import urllib.request

import torch
from safetensors.torch import load_file

from expertmesh.node.miner.config import parse_config
from expertmesh.protocol.codec import CodecConfig
from expertmesh.node.miner.daemon import Miner
from expertmesh.node.miner.metrics import MinerMetrics
from expertmesh.node.miner.progress import Progress
from expertmesh.node.miner.submit import Outbox
from expertmesh.protocol import identity
from expertmesh.protocol.admission import AdmissionConfig
from expertmesh.protocol.client import ValidatorClient
from expertmesh.protocol.experts import PROJS, expert_key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """Miner.run() in a thread, its progress lines in memory; stopped through its stop event."""

    def __init__(self, cfg, metrics: MinerMetrics | None = None):
        self.out = io.StringIO()
        self.stop = threading.Event()
        self.metrics = metrics or MinerMetrics()
        self.miner = Miner(cfg, self.stop, Progress("miner", 0, self.out), self.metrics)
        self.thread = threading.Thread(target=self.miner.run, daemon=True)
        self.thread.start()

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()

    def wait_for(self, text: str, timeout: float, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while sum(text in l for l in self.lines()) < count:
            assert self.thread.is_alive() and time.monotonic() < deadline, "\n".join(self.lines())
            time.sleep(0.05)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()


def config(tmp_path, key_file, address: str, **sections):
    doc = {"domain": "math", "key": str(key_file), "state_dir": str(tmp_path / "state"),
           "validator": {"address": address, "call_timeout_s": 5},
           "loop": {"poll_s": 0.2, "backoff_min_s": 1, "backoff_max_s": 2, "progress_every_s": 0}}
    for name, fields in sections.items():
        doc[name] = {**doc.get(name, {}), **fields}
    return parse_config(doc)


def test_no_validator_is_one_line_per_try_with_backoff(tmp_path, key_file):
    run = Running(config(tmp_path, key_file, f"127.0.0.1:{free_port()}"))
    try:
        run.wait_for("cannot take part", timeout=30, count=3)
    finally:
        run.finish()
    tries = [l for l in run.lines() if "cannot take part" in l]
    assert "UNAVAILABLE" in tries[0] and "retrying in 1s" in tries[0] and "retrying in 2s" in tries[1]
    assert run.lines()[-1].endswith("miner: stopped") and "Traceback" not in run.out.getvalue()


def test_refused_round_is_recorded_then_the_next_round_is_trained(tmp_path, key_file, validator, write_gsm8k):
    data = write_gsm8k(tmp_path / "math.jsonl", 120)
    port = free_port()
    cfg = config(tmp_path, key_file, validator.address,
                 data={"path": str(data), "template": "{question}\n{answer}", "max_tokens": 8192},
                 select={"profile_tokens": 512}, train={"steps": 2, "batch_size": 2, "checkpoint_every": 1})
    metrics = MinerMetrics()
    metrics.serve("127.0.0.1", port)
    run = Running(cfg, metrics)
    try:
        run.wait_for("does not score domain 'math'", timeout=30)  # nothing registered for math yet
        validator.register(data)  # math is scored from now on: round 1 scored nothing, so round 2 opens
        r = validator.node.book.current().round
        validator.refuse = "delta is for model version 0; round 1 trains version 1; fetch it and train again"
        run.wait_for(f"round {r}: refused; waiting for the next round", timeout=180)
        refusal = next(l for l in run.lines() if "the validator refused" in l)
        assert "FAILED_PRECONDITION" in refusal and "fetch it and train again" in refusal
        time.sleep(1.0)  # several polls: a refused round is not submitted again
        assert validator.admit_delta_calls == 1 and not validator.deltas(r)

        validator.refuse = None
        validator.next_round()
        run.wait_for(f"round {r + 1}: received", timeout=180)
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        run.finish()
        metrics.stop()
    book = json.loads((tmp_path / "state" / "submissions.json").read_text())
    assert book[str(r)]["outcome"] == "refused" and book[str(r + 1)]["outcome"] == "received"
    assert len(validator.deltas(r + 1)) == 1 and validator.admit_delta_calls == 2
    assert 'expertmesh_miner_submissions_total{outcome="refused"} 1.0' in scrape
    assert 'expertmesh_miner_submissions_total{outcome="received"} 1.0' in scrape
    assert "expertmesh_miner_inner_step 2.0" in scrape
    # Error feedback: what int8 rounded away is kept for the next round, and it is small.
    residual = load_file(tmp_path / "state" / "residual.safetensors")
    sent = validator.deltas(r + 1)[0][1]
    assert residual.keys() == sent.keys()
    assert all(residual[k].abs().max() <= sent[k].abs().max() / 127 for k in sent)


def _delta(moe_shapes: dict, experts: dict[int, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {expert_key(l, e, p): torch.randn(moe_shapes[expert_key(l, e, p)], generator=g) * 1e-3
            for l, es in experts.items() for e in es for p in PROJS}


def test_a_resend_is_the_same_submission_even_after_the_signature_expired(tmp_path, make_validator, key_file,
                                                                          write_gsm8k):
    validator = make_validator(admission=AdmissionConfig(timestamp_window_s=1.0))
    validator.register(write_gsm8k(tmp_path / "math.jsonl", 200))
    key = identity.load_key(key_file)
    outbox = Outbox(key, CodecConfig(), tmp_path / "residual.safetensors", "math")
    with ValidatorClient(validator.address) as client:
        rnd = client.get_round()
        work = tmp_path / "work"
        work.mkdir()
        delta = _delta(_shapes(validator), {0: [3], 2: [7]})
        prepared = outbox.prepare(work, delta, rnd, tokens=1024, data_digest="ab" * 32)
        first = outbox.send(client, prepared, rnd.model_sha256, rnd.pow_bits)
        assert (tmp_path / "residual.safetensors").is_file()  # promoted with the receipt
        again = outbox.send(client, outbox.load(work), rnd.model_sha256, rnd.pow_bits)  # a restart before it was recorded
        assert again.submission_id == first.submission_id
        time.sleep(1.6)  # the signed timestamp is now outside the validator's window
        late = outbox.send(client, outbox.load(work), rnd.model_sha256, rnd.pow_bits)
        assert late.submission_id == first.submission_id  # re-signed, same payload: still one submission
    assert len(validator.deltas(rnd.round)) == 1


def _shapes(validator) -> dict[str, tuple[int, int]]:
    return validator.node.runtime.moe.expert_shapes()
