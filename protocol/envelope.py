"""The signed envelope: a fixed byte layout, domain-separated signing, strict parsing.

The body is not protobuf because signed bytes must be canonical: parse(body) re-encodes to exactly
`body`, so the signature, the digest and the parsed fields always agree. The signature covers
PREFIX[kind] || body, so an envelope signed for one RPC (a dataset) never verifies for another
(a delta). Layout (big-endian), also in docs/protocol.md:

    u8 format=1 | public_key 32 | payload_sha256 32 | u64 payload_size | u64 model_version
    | model_sha256 32 | u64 round | u64 timestamp_ms | nonce 16 | u8 len + domain | u8 len + label
"""
from __future__ import annotations

import hashlib
import os
import struct
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from expertmesh.protocol import identity
from expertmesh.protocol.errors import MalformedEnvelope, ProtocolError
from expertmesh.protocol.types import NONCE_BYTES, Envelope, SignedEnvelope

FORMAT = 1
PREFIXES = {"delta": b"expertmesh/v1/delta|", "dataset": b"expertmesh/v1/dataset|",
            "commit": b"expertmesh/v1/commit|"}
PAYLOAD_KINDS = ("delta", "dataset")  # uploads; a commit names a delta's payload without carrying it
_FIXED = struct.Struct(">B32s32sQQ32sQQ16s")
MAX_BODY_BYTES = _FIXED.size + 1 + 64 + 1 + 128


def encode_body(env: Envelope) -> bytes:
    domain, label = env.domain.encode(), env.label.encode()
    return (_FIXED.pack(FORMAT, env.public_key, env.payload_sha256, env.payload_size, env.model_version,
                        env.model_sha256, env.round, env.timestamp_ms, env.nonce)
            + bytes([len(domain)]) + domain + bytes([len(label)]) + label)


def parse_body(body: bytes) -> Envelope:
    """The Envelope in `body`; MalformedEnvelope for anything that is not exactly a canonical body."""
    if not isinstance(body, bytes) or not _FIXED.size < len(body) <= MAX_BODY_BYTES:
        raise MalformedEnvelope(f"malformed envelope: body must be {_FIXED.size + 2}..{MAX_BODY_BYTES} bytes")
    fmt, pk, payload_sha, size, version, model_sha, rnd, ts, nonce = _FIXED.unpack_from(body)
    if fmt != FORMAT:
        raise MalformedEnvelope(f"malformed envelope: format {fmt} is not {FORMAT} (upgrade the sender or receiver)")
    pos = _FIXED.size
    texts = []
    for _ in range(2):
        if pos >= len(body):
            raise MalformedEnvelope("malformed envelope: truncated text field")
        n = body[pos]
        raw = body[pos + 1:pos + 1 + n]
        if len(raw) != n:
            raise MalformedEnvelope("malformed envelope: truncated text field")
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise MalformedEnvelope("malformed envelope: text field is not UTF-8") from None
        pos += 1 + n
    if pos != len(body):
        raise MalformedEnvelope("malformed envelope: trailing bytes after the label")
    try:
        env = Envelope(pk, payload_sha, size, version, model_sha, rnd, ts, nonce, texts[0], texts[1])
    except ProtocolError as exc:
        raise MalformedEnvelope(f"malformed envelope: {exc}") from None
    if encode_body(env) != body:  # unreachable for this layout today; keeps canonicity an invariant
        raise MalformedEnvelope("malformed envelope: not in canonical form")
    return env


def signed_message(kind: str, body: bytes) -> bytes:
    return PREFIXES[kind] + body


def digest(kind: str, body: bytes) -> bytes:
    """The submission id: sha256 of exactly what was signed."""
    return hashlib.sha256(signed_message(kind, body)).digest()


def sign_envelope(kind: str, env: Envelope, key: Ed25519PrivateKey) -> SignedEnvelope:
    if kind not in PREFIXES:
        raise ValueError(f"unknown envelope kind {kind!r}; use one of {sorted(PREFIXES)}")
    if identity.public_bytes(key) != env.public_key:
        raise ValueError("envelope.public_key is not the signing key's public key")
    body = encode_body(env)
    return SignedEnvelope(body=body, signature=identity.sign(key, signed_message(kind, body)))


def open_envelope(kind: str, signed: SignedEnvelope) -> Envelope:
    """Parse and verify: MalformedEnvelope or BadSignature, else the authenticated Envelope."""
    env = parse_body(signed.body)
    identity.verify(env.public_key, signed.signature, signed_message(kind, signed.body))
    return env


def new_envelope(key: Ed25519PrivateKey, *, payload_sha256: bytes, payload_size: int, model_version: int,
                 model_sha256: bytes, round: int, domain: str, label: str = "",
                 timestamp_ms: int | None = None) -> Envelope:
    """A fresh envelope: now as timestamp, a random nonce."""
    return Envelope(public_key=identity.public_bytes(key), payload_sha256=payload_sha256, payload_size=payload_size,
                    model_version=model_version, model_sha256=model_sha256, round=round,
                    timestamp_ms=int(time.time() * 1000) if timestamp_ms is None else timestamp_ms,
                    nonce=os.urandom(NONCE_BYTES), domain=domain, label=label)
