"""Floods from one peer: the replay table, and streams that send nothing or almost nothing.

Before: every correctly signed envelope's nonce was recorded before the backend refused it, in a table
capped at 100,000 that answered UNAVAILABLE to everyone once full; and 16 silent streams took all 16
RPC slots, so GetRound and Status failed until the idle watchdog cut them (60 s), and the attacker
reconnected. Now a nonce is recorded only once the backend took its envelope, one key's share of the
table is bounded, a full table forgets its oldest entries; uploads and downloads hold their own slots,
and a silent upload is evicted by a newcomer and cut after `first_frame_s`; a signed upload must keep
`min_upload_rate`.
"""
import threading
import time

import grpc

from arena import fresh_key, held_open, raw_call
from valhelpers import encode, ledger_rows, submit

from expertmesh.protocol import serde
from expertmesh.protocol.client import sign_upload


def test_a_nonce_flood_locks_no_other_key_out(live, honest_math):
    v = live(server={"max_tracked_nonces": 200, "max_nonces_per_key": 20}, rounds={"max_submissions": 1})
    info = v.client.get_round()
    attacker, n_flood = fresh_key(), 400  # twice the table, 20 times one key's share
    codes, done = [], threading.Event()

    def flood():  # envelope-only uploads for a far-future round, each with a fresh nonce, 4 at a time
        while len(codes) < n_flood or not done.is_set():
            calls = [raw_call(v.daemon.address, "SubmitDelta", iter([serde.upload_frame_to_proto(sign_upload(
                "delta", attacker, b"x" * 1024, model_version=info.model_version, model_sha256=info.model_sha256,
                round=info.round + 10**6, domain="math"), b"")])) for _ in range(4)]
            for f, channel in calls:
                err = f.exception()
                busy = err is not None and err.code() == grpc.StatusCode.UNAVAILABLE and err.details().startswith("busy")
                codes.append("busy" if busy else err.code() if err else grpc.StatusCode.OK)
                channel.close()

    attack = threading.Thread(target=flood)
    attack.start()
    try:  # another key, during the flood: its round is answered and its delta received and scored this round
        assert v.client.get_round().round == info.round
        receipt, _ = submit(v.client, fresh_key(), encode(honest_math.delta, info.model_version))
    finally:
        done.set()
        attack.join()
    assert receipt.round == info.round
    assert v.verdicts([receipt.submission_id.hex()])[receipt.submission_id.hex()]["verdict"] == "accepted"
    # Every flood call was refused for its round, or told the upload slots were busy (never that a table
    # is full), and recorded nothing: refusals of one kind from one address are logged once a minute, not
    # once a call.
    assert len(codes) >= n_flood and set(codes) <= {grpc.StatusCode.FAILED_PRECONDITION, "busy"}, set(codes)
    assert codes.count(grpc.StatusCode.FAILED_PRECONDITION) >= n_flood // 2, codes.count("busy")
    log = v.daemon.log_path.read_text()
    assert 1 <= log.count("refused SubmitDelta") <= 6, log.count("refused SubmitDelta")


def test_silent_and_trickling_streams_starve_nobody(live, honest_math):
    v = live(server={"max_uploads": 8, "max_uploads_per_host": 4, "first_frame_s": 30, "min_upload_rate": 65536,
                     "rate_window_s": 2, "idle_timeout_s": 120})
    release = threading.Event()
    info = v.client.get_round()
    try:
        # 16 streams that send nothing at all (no key needed), more than all upload slots.
        silent = [raw_call(v.daemon.address, "SubmitDelta", held_open(release=release), timeout_s=120)
                  for _ in range(16)]
        # And a signed one with a real commitment, trickling its payload a byte at a time.
        trickler = fresh_key()
        payload = encode(honest_math.delta, info.model_version)
        env = submit_commitment(v, trickler, payload)
        for _ in range(30):  # a slot frees once a silent stream is old enough to be evicted (Overloaded until)
            trickle = raw_call(v.daemon.address, "SubmitDelta", trickled(env, payload, release), timeout_s=300)
            try:
                trickle[0].exception(timeout=2)
            except grpc.FutureTimeoutError:
                break  # it is in, trickling
            trickle[1].close()
            time.sleep(0.5)

        # Small calls are answered meanwhile; an honest miner's delta is received in the same round.
        assert v.client.get_round().round == info.round and v.client.status().model_version == info.model_version
        receipt, _ = submit(v.client, fresh_key(), encode(honest_math.delta, info.model_version, tokens=1))
        assert receipt.round == info.round
        # The trickler was cut for its rate, not served; the silent streams were evicted or are still held.
        err = trickle[0].exception(timeout=240)
        assert err is not None and err.code() == grpc.StatusCode.CANCELLED, err
        assert "bytes/s, under the minimum" in v.daemon.log_path.read_text()
    finally:
        release.set()
        for f, channel in silent + [trickle]:
            channel.close()
    assert ledger_rows(v.state, "SELECT COUNT(*) AS n FROM submissions")[0]["n"] == 1


def submit_commitment(v, key, payload: bytes):
    """Commit to `payload` as a miner does and return the signed upload envelope for it."""
    from expertmesh.protocol.client import sign_commit

    info = v.client.get_round()
    fields = dict(model_version=info.model_version, model_sha256=info.model_sha256, round=info.round, domain="math")
    v.client.commit_delta(sign_commit(key, payload, **fields, pow_bits=info.pow_bits))
    return sign_upload("delta", key, payload, **fields)


def trickled(env, payload: bytes, release: threading.Event, every_s: float = 1.0):
    yield serde.upload_frame_to_proto(env, payload[:1])
    for i in range(1, len(payload)):
        if release.wait(every_s):
            return
        yield serde.upload_frame_to_proto(None, payload[i:i + 1])
