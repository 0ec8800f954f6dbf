"""Overflow and orphans. Before: the delta header allowed `token_count` up to 2^64-1, which overflows
SQLite's INTEGER; a 2^63 claim got INTERNAL, and as the payload was spooled before its ledger row, each
try left a file with no row, so `max_per_miner` never applied and one key could fill the disk. Now every
wire integer is bounded at parse time to what SQLite holds, no spooled file outlives a failed insert,
and a key over its quota is refused before a byte of its payload is read."""
import threading

import grpc
import pytest

from arena import MAX_U63, fresh_key, held_open, raw_call
from test_floods import submit_commitment
from valhelpers import encode, ledger_rows, submit

from expertmesh.protocol import serde
from expertmesh.protocol.errors import RemoteError


def spooled(state) -> list[str]:
    root = state / "spool"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_an_overflowing_token_count_is_refused_and_leaves_nothing(live, honest_math):
    v = live()
    key, version = fresh_key(), v.client.get_round().model_version
    for claim in (MAX_U63 + 1, 2**64 - 1, MAX_U63 + 12345):
        with pytest.raises(RemoteError) as err:
            submit(v.client, key, encode(honest_math.delta, version, tokens=claim))
        assert err.value.code == "INVALID_ARGUMENT" and "token_count" in err.value.details, err.value
    assert spooled(v.state) == [] and ledger_rows(v.state, "SELECT * FROM submissions") == []
    # The largest value SQLite holds is taken, and the same key still has its quota.
    receipt, _ = submit(v.client, key, encode(honest_math.delta, version, tokens=MAX_U63))
    assert spooled(v.state) == [f"r{receipt.round}/{receipt.submission_id.hex()}.delta"]


def test_a_key_over_its_quota_is_refused_before_its_payload(live, honest_math, second_math):
    v = live(rounds={"max_per_miner": 1})
    key, version = fresh_key(), v.client.get_round().model_version
    submit(v.client, key, encode(honest_math.delta, version))
    payload = encode(second_math.delta, version)
    env = submit_commitment(v, key, payload)
    release = threading.Event()
    call, channel = raw_call(v.daemon.address, "SubmitDelta",
                             held_open(serde.upload_frame_to_proto(env, b""), release=release))
    try:  # answered while the stream still holds its payload back
        err = call.exception(timeout=60)
    finally:
        release.set()
        channel.close()
    assert err is not None and err.code() == grpc.StatusCode.ALREADY_EXISTS, err
    assert len(spooled(v.state)) == 1
