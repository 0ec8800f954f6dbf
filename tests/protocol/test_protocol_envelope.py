"""Envelope bytes, signatures, admission order and the bounded replay table."""
from __future__ import annotations

import dataclasses
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertmesh.protocol import envelope as E
from expertmesh.protocol import identity
from expertmesh.protocol.admission import Admission, AdmissionConfig, KeyPolicy, ReplayGuard
from expertmesh.protocol.errors import (BadSignature, BannedKey, KeyOverloaded, MalformedEnvelope, Oversize, ReplayedNonce, StaleTimestamp,
                             UnknownKey)
from expertmesh.protocol.types import Envelope, SignedEnvelope

KEY = identity.generate_key()
NOW = 1_800_000_000_000


def env(**changes) -> Envelope:
    base = Envelope(identity.public_bytes(KEY), hashlib.sha256(b"p").digest(), 1, 2, bytes(32), 3, NOW,
                    bytes(range(16)), "math", "label ü")
    return dataclasses.replace(base, **changes)


def test_body_is_canonical_and_round_trips():
    e = env()
    body = E.encode_body(e)
    assert E.parse_body(body) == e and len(body) == 145 + 1 + 4 + 1 + len("label ü".encode())
    signed = E.sign_envelope("delta", e, KEY)
    assert E.open_envelope("delta", signed) == e
    assert E.digest("delta", signed.body) != E.digest("dataset", signed.body)


def test_signature_binds_kind_and_every_byte():
    signed = E.sign_envelope("delta", env(), KEY)
    with pytest.raises(BadSignature):
        E.open_envelope("dataset", signed)
    for i in range(len(signed.body)):
        body = bytearray(signed.body)
        body[i] ^= 0x01
        with pytest.raises((BadSignature, MalformedEnvelope)):
            E.open_envelope("delta", SignedEnvelope(bytes(body), signed.signature))


def test_signing_mistakes():
    with pytest.raises(ValueError, match="not the signing key"):
        E.sign_envelope("delta", env(public_key=bytes(32)), KEY)
    with pytest.raises(ValueError, match="unknown envelope kind"):
        E.sign_envelope("weights", env(), KEY)
    with pytest.raises(ValueError, match="domain"):
        env(domain="Math Stuff")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_parser_fuzz_only_malformed(body):
    try:
        parsed = E.parse_body(body)
    except MalformedEnvelope:
        return
    assert E.encode_body(parsed) == body


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 260), st.binary(min_size=1, max_size=8), st.binary(max_size=80))
def test_open_fuzz_mutated_envelopes(pos, patch, sig):
    body = E.sign_envelope("delta", env(), KEY).body
    mutated = body[:pos] + patch + body[pos + len(patch):]
    with pytest.raises((MalformedEnvelope, BadSignature)):
        E.open_envelope("delta", SignedEnvelope(mutated, sig))


def admission(**cfg) -> Admission:
    return Admission(AdmissionConfig(**cfg))


def test_admission_checks_and_order():
    a = admission(timestamp_window_s=60, max_payload_bytes={"delta": 100, "dataset": 100})
    good = E.sign_envelope("delta", env(), KEY)
    sub = a.admit("delta", good, now_ms=NOW + 59_000)
    assert sub.digest == E.digest("delta", good.body) and not sub.resubmission
    assert a.admit("delta", good, now_ms=NOW).resubmission  # same signed header: flagged, not refused
    with pytest.raises(ReplayedNonce):
        a.admit("delta", E.sign_envelope("delta", env(round=4), KEY), now_ms=NOW)
    with pytest.raises(StaleTimestamp):
        a.admit("delta", E.sign_envelope("delta", env(nonce=os.urandom(16)), KEY), now_ms=NOW + 61_000)
    with pytest.raises(Oversize):
        a.admit("delta", E.sign_envelope("delta", env(nonce=os.urandom(16), payload_size=101), KEY), now_ms=NOW)
    before = len(a.replay)
    forged = SignedEnvelope(E.encode_body(env(nonce=os.urandom(16))), bytes(64))
    with pytest.raises(BadSignature):
        a.admit("delta", forged, now_ms=NOW)
    assert len(a.replay) == before  # unauthenticated envelopes never reach the replay table


def test_allow_list():
    a = Admission(AdmissionConfig(), KeyPolicy(allow=frozenset({bytes(32)})))
    with pytest.raises(UnknownKey):
        a.admit("delta", E.sign_envelope("delta", env(), KEY), now_ms=NOW)


def test_key_policy_files(tmp_path):
    other = identity.generate_key()
    allow, deny = tmp_path / "allow", tmp_path / "deny"
    allow.write_text(f"# miners\n{identity.key_id(identity.public_bytes(KEY))}  # alice\n\n"
                     f"{identity.key_id(identity.public_bytes(other)).upper()}\n")
    deny.write_text(identity.key_id(identity.public_bytes(other)) + "\n")
    policy = KeyPolicy.from_files(allow, deny)
    policy.check(identity.public_bytes(KEY))
    with pytest.raises(BannedKey):
        policy.check(identity.public_bytes(other))
    with pytest.raises(UnknownKey):
        policy.check(bytes(32))
    deny.write_text("not-a-key\n")
    with pytest.raises(ValueError, match="deny:1"):
        KeyPolicy.from_files(None, deny)


def test_replay_table_is_bounded_by_window_size_and_key():
    guard = ReplayGuard(window_s=10, max_entries=3, max_per_key=2)
    alice, bob, carol = bytes(32), bytes([1]) * 32, bytes([2]) * 32
    for i in range(2):
        assert not guard.check_and_record(alice, bytes([i]) * 16, b"a%d" % i, NOW, NOW)
    with pytest.raises(KeyOverloaded):  # alice is over her share; nobody else is
        guard.check(alice, b"x" * 16, b"ax", NOW)
    assert guard.check(alice, bytes([0]) * 16, b"a0", NOW)  # a known one is still a resubmission
    assert not guard.check_and_record(bob, b"b" * 16, b"b0", NOW + 1, NOW)
    # Full: carol's entry is recorded and the one soonest to expire (alice's first) is forgotten.
    assert not guard.check_and_record(carol, b"c" * 16, b"c0", NOW + 2, NOW)
    assert len(guard) == 3 and not guard.check(alice, bytes([0]) * 16, b"other", NOW)
    assert not guard.check(alice, b"x" * 16, b"ax", NOW)  # and alice has room for one again
    assert guard.check(alice, bytes([1]) * 16, b"a1", NOW + 10_000)  # still inside the window
    assert not guard.check_and_record(bob, b"y" * 16, b"by", NOW + 10_003, NOW + 10_003)  # old ones forgotten
    assert len(guard) == 1


def test_checking_records_nothing():
    guard = ReplayGuard(window_s=10, max_entries=3)
    for i in range(10):
        assert not guard.check(bytes(32), bytes([i]) * 16, b"d", NOW)
    assert len(guard) == 0