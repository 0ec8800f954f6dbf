"""Validator discovery: signed announcements (fast), then real DHT peers on 127.0.0.1 (slow).

The multi-process test joins three kinds of peer: `expertmesh bootstrap` as a subprocess, a validator
peer from protocol.discovery.start_dht, and a plain peer built directly with hivemind.DHT.
"""
from __future__ import annotations

import dataclasses
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer

from expertmesh.protocol import identity, serde
from expertmesh.protocol.discovery import (VALIDATORS_KEY, AnnouncementValidator, DiscoveryConfig, _VALIDATORS_KEY_ID,
                                announce_validator, find_validators, new_record, sign_announcement, start_dht,
                                verify_announcement)
from expertmesh.protocol.errors import BadSignature, StaleTimestamp
from expertmesh.protocol.types import SignedAnnouncement

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
KEY = identity.generate_key()
SHA = bytes(range(32))


def record(**changes):
    r = new_record(KEY, endpoint="127.0.0.1:50051", model_version=4, model_sha256=SHA, round=9,
                   domains=("math", "code"), ttl_s=60)
    return dataclasses.replace(r, **changes)


def test_announcement_sign_verify():
    now = int(time.time() * 1000)
    signed = sign_announcement(KEY, record())
    assert verify_announcement(signed, now_ms=now, max_ttl_s=3600).endpoint == "127.0.0.1:50051"
    with pytest.raises(BadSignature):
        verify_announcement(SignedAnnouncement(signed.record, bytes(64)), now_ms=now, max_ttl_s=3600)
    with pytest.raises(StaleTimestamp, match="expired"):
        verify_announcement(signed, now_ms=now + 61_000, max_ttl_s=3600)
    with pytest.raises(StaleTimestamp, match="too long"):
        verify_announcement(sign_announcement(KEY, record(expires_ms=now + 7_200_000)), now_ms=now, max_ttl_s=3600)
    with pytest.raises(ValueError, match="not the signing key"):
        sign_announcement(identity.generate_key(), record())


def _dht_record(subkey, value, expiration):
    return DHTRecord(_VALIDATORS_KEY_ID, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), expiration)


def test_record_validator_refuses_forgeries():
    v = AnnouncementValidator()
    r = record()
    good = serde.signed_announcement_to_bytes(sign_announcement(KEY, r))
    kid = identity.key_id(r.public_key)
    assert v.validate(_dht_record(kid, good, r.expires_ms / 1000))
    assert not v.validate(_dht_record("00" * 32, good, r.expires_ms / 1000))  # another validator's slot
    assert not v.validate(_dht_record(kid, good, r.expires_ms / 1000 + 3600))  # outliving its signature
    assert not v.validate(_dht_record(kid, b"garbage", r.expires_ms / 1000))
    assert not v.validate(DHTRecord(_VALIDATORS_KEY_ID, b"\xc1", b"\xc1", 0))  # not even msgpack
    assert v.validate(DHTRecord(b"other key", b"", b"anything", 0))  # other keys are not ours to judge


def peer_id_of(key) -> str:
    """libp2p peer id of an Ed25519 key: identity multihash of its protobuf public key, base58."""
    return PeerID(bytes([0x00, 36, 0x08, 0x01, 0x12, 0x20]) + identity.public_bytes(key)).to_base58()


def read_lines(proc: subprocess.Popen, n: int, timeout: float) -> list[str]:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    lines, deadline = [], time.monotonic() + timeout
    while len(lines) < n and time.monotonic() < deadline:
        if sel.select(timeout=deadline - time.monotonic()):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
    return lines


@pytest.mark.slow
def test_bootstrap_validator_and_plain_hivemind_peer(tmp_path):
    import hivemind

    boot_key = tmp_path / "boot.key"
    identity.save_key(identity.generate_key(), boot_key)
    boot = subprocess.Popen([sys.executable, "-m", "expertmesh", "bootstrap", "--identity", str(boot_key)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dhts = []
    try:
        maddrs = read_lines(boot, 1, timeout=60)
        assert maddrs and maddrs[0].startswith("/ip4/127.0.0.1/tcp/"), boot.stderr.read() if boot.poll() else maddrs
        assert maddrs[0].endswith("/p2p/" + peer_id_of(identity.load_key(boot_key)))  # stable: from --identity
        config = DiscoveryConfig(initial_peers=tuple(maddrs), timeout_s=20)
        validator = start_dht(config)
        dhts.append(validator)
        plain = hivemind.DHT(initial_peers=maddrs, host_maddrs=LOOPBACK, nat_port_map=False, start=True)
        dhts.append(plain)

        other = identity.generate_key()
        assert announce_validator(validator, KEY, record(), config)
        law = new_record(other, endpoint="127.0.0.1:50052", model_version=4, model_sha256=SHA, round=10,
                         domains=("law",), ttl_s=60)
        assert announce_validator(validator, other, law, config)
        assert [r.endpoint for r in find_validators(plain, config=config)] == ["127.0.0.1:50052", "127.0.0.1:50051"]

        # A plain hivemind peer stores anything: junk, and another key's announcement in KEY's slot.
        plain.store(VALIDATORS_KEY, b"junk", time.time() + 60, subkey="ab" * 32)
        stolen = serde.signed_announcement_to_bytes(sign_announcement(other, dataclasses.replace(law, round=99)))
        plain.store(VALIDATORS_KEY, stolen, time.time() + 120, subkey=identity.key_id(identity.public_bytes(KEY)))
        # Lookups drop both. On the plain peer the forgery did displace KEY's entry (it has a later
        # expiration) - what lookups cannot undo; our peers refused to store it and still have KEY's.
        assert [r.endpoint for r in find_validators(plain, config=config)] == ["127.0.0.1:50052"]
        from_validator = find_validators(validator, config=config)
        assert [(r.endpoint, r.round) for r in from_validator] == [("127.0.0.1:50052", 10), ("127.0.0.1:50051", 9)]
        assert [r.endpoint for r in find_validators(validator, domain="math", config=config)] == ["127.0.0.1:50051"]
    finally:
        for d in dhts:
            d.shutdown()
        boot.send_signal(signal.SIGTERM)
        try:
            rc = boot.wait(timeout=20)
        finally:
            if boot.poll() is None:
                boot.kill()
    assert rc == 0, boot.stderr.read()[-2000:]
