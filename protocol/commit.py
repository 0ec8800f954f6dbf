"""Commit, then reveal: a delta's payload is named (and paid for) before anyone can see it.

A miner first sends CommitDelta with an envelope of kind "commit" whose payload_sha256 field holds
commitment(its key, sha256(payload)) and whose label holds a proof-of-work nonce (hex); only then
does it upload the payload with SubmitDelta. The validator keeps the order of commitments, and when
two deltas are copies of one another the earlier commitment keeps its claim. Whoever sees a payload on
the wire sees it only after its author's commitment arrived, and cannot have committed to it earlier:
the commitment includes the author's key, so it cannot be replayed under another.

Proof of work: sha256(POW_PREFIX || key || commitment || nonce) must start with `bits` zero bits,
about 2^bits hashes for the sender and one for the validator (docs/SECURITY.md "Identity").
"""
from __future__ import annotations

import hashlib
import itertools

COMMITMENT_PREFIX = b"expertmesh/v1/commitment|"
POW_PREFIX = b"expertmesh/v1/pow|"
MAX_NONCE_HEX = 32


def commitment(public_key: bytes, payload_sha256: bytes) -> bytes:
    return hashlib.sha256(COMMITMENT_PREFIX + public_key + payload_sha256).digest()


def _zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def work_bits(public_key: bytes, commit: bytes, nonce_hex: str) -> int:
    """Leading zero bits of the proof; 0 for a label that is not a nonce."""
    if not nonce_hex or len(nonce_hex) > MAX_NONCE_HEX:
        return 0
    try:
        nonce = bytes.fromhex(nonce_hex)
    except ValueError:
        return 0
    return _zero_bits(hashlib.sha256(POW_PREFIX + public_key + commit + nonce).digest())


def solve(public_key: bytes, commit: bytes, bits: int) -> str:
    """A nonce (hex) whose proof has at least `bits` zero bits: about 2^bits sha256 calls (22 bits: ~2 s)."""
    if bits <= 0:
        return ""
    prefix = hashlib.sha256(POW_PREFIX + public_key + commit)
    for i in itertools.count():
        h = prefix.copy()
        nonce = i.to_bytes(8, "big")
        h.update(nonce)
        if _zero_bits(h.digest()) >= bits:
            return nonce.hex()
    raise AssertionError("unreachable")
