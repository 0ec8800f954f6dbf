"""SIGKILL at every phase of a round, by property: 30 seeded trials on one validator's state.

Each trial starts `expertmesh validator run` on the same state directory with one kill point armed
(scheduler.PhaseHooks: received, spooled, scoring, merging, publish = the checkpoint written,
commit = renamed into place, announcing), or kills it itself while an upload is half received;
two miners submit to the open round; the validator dies at that point (or, when the round never
reaches it, is killed once the round is done). The next trial's start is the previous one's
recovery. After every trial, from the files alone:
- no submission that got a receipt is lost;
- no verdict ever changes (nothing is scored twice);
- every published version verifies against its manifest, and its ledger row has that manifest's sha256;
- every accepted submission is merged in exactly one version: the one its round published;
and at the end, after a clean run and stop, the ledger and the spool agree.
"""
import random
from collections import Counter

import pytest

from expertmesh.protocol import identity, serde
from expertmesh.protocol.client import ClientConfig, ValidatorClient, sign_commit, sign_upload
from expertmesh.protocol.manifest import verify
from expertmesh.protocol.types import RoundPhase
from expertmesh.validator.publish import manifest_sha256
from expertmesh.validator.scheduler import PhaseHooks
from valhelpers import Daemon, config_doc, encode, ledger_rows, submit, wait_until, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
TRIALS, SEED = 30, 20261203
POINTS = PhaseHooks.POINTS + ("receiving",)  # receiving: killed by the test mid-upload


def test_sigkill_at_random_phases_loses_nothing_and_scores_nothing_twice(tmp_path, trained, trained_other,
                                                                        math_payload):
    state = tmp_path / "state"
    doc = config_doc(state, rounds={"duration_s": 3600, "max_submissions": 2, "poll_s": 0.1},
                     scoring={"profile_tokens": 2048}, publish={"keep_versions": 100},
                     merge={"outer_lr": 0.25},  # small steps: the same two deltas (halved) keep helping for rounds
                     datasets={"preload": [{"domain": "math", "path": str(math_payload), "name": "gsm8k"}]})
    config = write_config(tmp_path / "validator.toml", doc)
    log = tmp_path / "validator.log"
    rng = random.Random(SEED)
    receipts: dict[str, int] = {}  # digest -> round, for every upload the validator acknowledged
    scored: dict[str, tuple] = {}  # digest -> its verdict row, as first seen
    merged: dict[int, list[str]] = {}  # version -> the submissions its manifest lists
    armed = Counter()

    for trial in range(TRIALS):
        point = rng.choice(POINTS)
        nth = rng.choice((1, 2)) if point in ("received", "spooled", "scoring") else 1
        armed[point] += 1
        spec = "" if point == "receiving" else f"{point}=kill:{nth}"
        daemon = Daemon(config, log, env={PhaseHooks.ENV: spec})
        try:
            run_round(daemon, state, point, rng, receipts, (trained.delta, trained_other.delta))
        finally:
            daemon.cleanup()
        check(state, receipts, scored, merged, f"trial {trial} ({point}, {nth})")

    daemon = Daemon(config, log)  # a clean run finishes whatever the last kill left
    try:
        with ValidatorClient(daemon.address, ClientConfig(call_timeout_s=30)) as client:
            wait_until(lambda: settled(state), 300, "the round in progress to settle", daemon)
            client.get_round()
        assert daemon.terminate() == 0
    finally:
        daemon.cleanup()
    check(state, receipts, scored, merged, "after a clean run")
    spool_agrees(state)
    assert len(merged) >= 3 and len(armed) >= 6, (merged.keys(), armed)  # the seed reaches most points


def run_round(daemon: Daemon, state, point: str, rng: random.Random, receipts: dict, deltas) -> None:
    with ValidatorClient(daemon.address, ClientConfig(call_timeout_s=30, upload_timeout_s=60, busy_retries=0)) as c:
        try:
            info = c.get_round()
        except Exception:
            return  # it died recovering (the armed point came first): that is this trial
        if info.phase is RoundPhase.OPEN:
            if point == "receiving":
                return half_upload_then_kill(daemon, c, deltas[0], info)
            for delta in rng.sample(deltas, len(deltas)):
                try:
                    half = {k: 0.5 * v for k, v in delta.items()}
                    receipt, _ = submit(c, identity.generate_key(), encode(half, info.model_version,
                                                                           tokens=rng.randrange(1, 10**6)))
                except Exception:  # it died while taking this one: any receipt it gave is recorded
                    break
                receipts[receipt.submission_id.hex()] = receipt.round
        wait_until(lambda: daemon.proc.poll() is not None or round_done(state, info.round), 300,
                   f"a kill at {point} or round {info.round} done")
    if daemon.proc.poll() is None:  # the armed point did not come this round: kill it when idle
        daemon.kill()


def half_upload_then_kill(daemon: Daemon, client, delta, info) -> None:
    import threading

    import grpc

    from expertmesh.protocol import expertmesh_pb2_grpc as pbg

    key, payload = identity.generate_key(), encode(delta, info.model_version)
    fields = dict(model_version=info.model_version, model_sha256=info.model_sha256, round=info.round, domain="math")
    client.commit_delta(sign_commit(key, payload, **fields, pow_bits=info.pow_bits))
    env, sent, hold = sign_upload("delta", key, payload, **fields), threading.Event(), threading.Event()

    def frames():
        yield serde.upload_frame_to_proto(env, payload[: len(payload) // 2])
        sent.set()
        hold.wait(60)

    with grpc.insecure_channel(daemon.address) as channel:
        call = pbg.ValidatorStub(channel).SubmitDelta.future(frames(), timeout=60)
        sent.wait(30)
        wait_until(lambda: any((state_of(daemon) / "spool" / "incoming").iterdir()), 30, "the partial upload")
        daemon.kill()
        hold.set()
        call.exception()


def state_of(daemon: Daemon):
    return daemon.log_path.parent / "state"


def round_done(state, number: int) -> bool:
    rows = ledger_rows(state, "SELECT state FROM rounds WHERE round=?", (number,))
    return bool(rows) and rows[0]["state"] in ("published", "empty")


def settled(state) -> bool:
    (cur,) = ledger_rows(state, "SELECT * FROM rounds ORDER BY round DESC LIMIT 1")
    pending = ledger_rows(state, "SELECT COUNT(*) AS n FROM submissions WHERE round=?", (cur["round"],))[0]["n"]
    return cur["state"] == "open" and pending < 2


def check(state, receipts: dict, scored: dict, merged: dict, when: str) -> None:
    subs = {r["digest"] for r in ledger_rows(state, "SELECT digest FROM submissions")}
    lost = set(receipts) - subs
    assert not lost, f"{when}: acknowledged submissions lost: {lost}"
    verdicts = {r["digest"]: r for r in ledger_rows(state, "SELECT * FROM verdicts")}
    for digest, first in scored.items():
        assert tuple(verdicts[digest].values()) == first, f"{when}: the verdict of {digest[:16]} changed"
    scored.update({d: tuple(v.values()) for d, v in verdicts.items() if d not in scored})
    for v in ledger_rows(state, "SELECT * FROM versions WHERE version > 0"):
        directory = state / "checkpoints" / f"v{v['version']}"
        manifest = verify(directory).doc
        assert v["manifest_sha256"] == manifest_sha256(directory), f"{when}: v{v['version']} hash"
        listed = [a["submission"] for a in manifest["accepted"]]
        assert merged.setdefault(v["version"], listed) == listed, f"{when}: v{v['version']} changed"
        accepted = {d for d, x in verdicts.items() if x["round"] == v["round"] and x["verdict"] == "accepted"}
        assert set(listed) == accepted, f"{when}: v{v['version']} merged {listed}, round accepted {accepted}"
    twice = [d for d, n in Counter(d for ds in merged.values() for d in ds).items() if n > 1]
    assert not twice, f"{when}: merged in two versions: {twice}"


def spool_agrees(state) -> None:
    rows = ledger_rows(state, "SELECT s.path FROM submissions s JOIN rounds r ON r.round = s.round "
                              "WHERE r.state NOT IN ('published', 'empty')")
    files = {p.relative_to(state / "spool").as_posix() for p in (state / "spool").glob("r*/*.delta")}
    assert files == {r["path"] for r in rows}, (files, rows)
    assert not list((state / "spool" / "incoming").iterdir())
    dirs = {p.name for p in (state / "checkpoints").iterdir()}
    versions = {f"v{r['version']}" for r in ledger_rows(state, "SELECT version FROM versions")}
    assert dirs == versions, (dirs, versions)
