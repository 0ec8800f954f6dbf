"""The protocol's domain types: plain frozen dataclasses. Protobuf never leaves protocol/serde.py.

Constructors check the invariants a peer could break (lengths, ranges, name syntax), so decoding an
untrusted message through serde raises ProtocolError instead of building a value that breaks later.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

from expertmesh.protocol.errors import ProtocolError

KEY_BYTES = 32  # Ed25519 public key
SIG_BYTES = 64  # Ed25519 signature
SHA_BYTES = 32
NONCE_BYTES = 16
# Wire integers are uint64, but each is kept in SQLite, whose INTEGER is signed 64-bit: a larger value is
# refused when it is parsed, never stored as an overflow.
INT_MAX = 2**63 - 1
DOMAIN_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_LABEL_BYTES = 128
MAX_NAME_BYTES = 256
MAX_DOMAINS = 64
MAX_ENDPOINT_BYTES = 256


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ProtocolError(message)


def _check_bytes(name: str, value: bytes, size: int) -> None:
    _need(isinstance(value, bytes) and len(value) == size, f"{name} must be {size} bytes")


def _check_u64(name: str, value: int) -> None:
    _need(isinstance(value, int) and 0 <= value <= INT_MAX, f"{name} must be an integer in [0, 2^63)")


def check_domain(domain: str) -> None:
    _need(isinstance(domain, str) and DOMAIN_RE.match(domain) is not None,
          f"domain {domain!r} must match {DOMAIN_RE.pattern} (lowercase letters, digits, '.', '_', '-')")


def _check_text(name: str, value: str, max_bytes: int) -> None:
    _need(isinstance(value, str) and len(value.encode("utf-8", "surrogatepass")) <= max_bytes
          and value.isprintable(), f"{name} must be printable text of at most {max_bytes} UTF-8 bytes")


@dataclass(frozen=True)
class Envelope:
    """The signed header of an upload; docs/protocol.md gives its byte layout."""

    public_key: bytes
    payload_sha256: bytes
    payload_size: int
    model_version: int
    model_sha256: bytes
    round: int
    timestamp_ms: int
    nonce: bytes
    domain: str
    label: str = ""  # free text, e.g. a dataset's name

    def __post_init__(self) -> None:
        _check_bytes("public_key", self.public_key, KEY_BYTES)
        _check_bytes("payload_sha256", self.payload_sha256, SHA_BYTES)
        _check_bytes("model_sha256", self.model_sha256, SHA_BYTES)
        _check_bytes("nonce", self.nonce, NONCE_BYTES)
        for name in ("payload_size", "model_version", "round", "timestamp_ms"):
            _check_u64(name, getattr(self, name))
        check_domain(self.domain)
        _check_text("label", self.label, MAX_LABEL_BYTES)


@dataclass(frozen=True)
class SignedEnvelope:
    """An envelope as it travels: raw body bytes (parsed only by protocol.envelope) and a signature."""

    body: bytes
    signature: bytes


@dataclass(frozen=True)
class Submission:
    """A verified upload header, as a backend sees it.

    `digest` = sha256(PREFIX || body) identifies the signed submission. `resubmission` is True when
    this server saw the same digest within the timestamp window (a retry or a replay of the same
    signed bytes); backends must treat a known digest idempotently either way (docs/protocol.md).
    """

    kind: str  # "delta" | "dataset"
    envelope: Envelope
    signature: bytes
    digest: bytes
    resubmission: bool = False


@dataclass(frozen=True)
class Receipt:
    submission_id: bytes
    round: int
    payload_bytes: int
    message: str = ""

    def __post_init__(self) -> None:
        _check_bytes("submission_id", self.submission_id, SHA_BYTES)
        _check_u64("round", self.round)
        _check_u64("payload_bytes", self.payload_bytes)
        _check_text("message", self.message, 1024)


@dataclass(frozen=True)
class DatasetReceipt:
    submission_id: bytes
    dataset_id: str
    message: str = ""

    def __post_init__(self) -> None:
        _check_bytes("submission_id", self.submission_id, SHA_BYTES)
        _check_text("dataset_id", self.dataset_id, MAX_NAME_BYTES)
        _check_text("message", self.message, 1024)


@dataclass(frozen=True)
class BlobHeader:
    """What a download announces before its bytes: the receiver bounds and verifies against it."""

    name: str
    version: int
    size: int
    sha256: bytes

    def __post_init__(self) -> None:
        _check_text("name", self.name, MAX_NAME_BYTES)
        _check_u64("version", self.version)
        _check_u64("size", self.size)
        _check_bytes("sha256", self.sha256, SHA_BYTES)


@dataclass(frozen=True)
class Blob:
    """A file a backend offers for download (server side only; never sent as is)."""

    header: BlobHeader
    path: Path


@dataclass(frozen=True)
class CheckpointRef:
    version: int
    name: str

    def __post_init__(self) -> None:
        _check_u64("version", self.version)
        _check_text("name", self.name, MAX_NAME_BYTES)


@dataclass(frozen=True)
class DatasetInfo:
    dataset_id: str
    domain: str
    name: str
    owner_key: bytes
    size: int
    sha256: bytes
    registered_ms: int

    def __post_init__(self) -> None:
        _check_text("dataset_id", self.dataset_id, MAX_NAME_BYTES)
        check_domain(self.domain)
        _check_text("name", self.name, MAX_LABEL_BYTES)
        _check_bytes("owner_key", self.owner_key, KEY_BYTES)
        _check_u64("size", self.size)
        _check_bytes("sha256", self.sha256, SHA_BYTES)
        _check_u64("registered_ms", self.registered_ms)


class RoundPhase(enum.Enum):
    OPEN = "open"  # accepting submissions
    CLOSED = "closed"  # scoring, merging or publishing: submit to the next round


@dataclass(frozen=True)
class RoundInfo:
    round: int
    model_version: int
    model_sha256: bytes
    phase: RoundPhase
    domains: tuple[str, ...]
    closes_at_ms: int
    heldout_fraction: float  # the validator's: which records it holds out (protocol.heldout)
    pow_bits: int = 0  # proof of work a commitment from a key without standing carries (protocol.commit)

    def __post_init__(self) -> None:
        _check_u64("round", self.round)
        _check_u64("model_version", self.model_version)
        _check_bytes("model_sha256", self.model_sha256, SHA_BYTES)
        _need(isinstance(self.phase, RoundPhase), "phase must be a RoundPhase")
        _need(isinstance(self.domains, tuple) and len(self.domains) <= MAX_DOMAINS, f"at most {MAX_DOMAINS} domains")
        for d in self.domains:
            check_domain(d)
        _check_u64("closes_at_ms", self.closes_at_ms)
        _need(isinstance(self.heldout_fraction, float) and 0 < self.heldout_fraction < 1,
              "heldout_fraction must be within (0, 1)")
        _need(isinstance(self.pow_bits, int) and 0 <= self.pow_bits <= 64, "pow_bits must be within [0, 64]")


@dataclass(frozen=True)
class NodeStatus:
    public_key: bytes
    role: str
    software_version: str
    model_version: int
    round: int
    uptime_s: int

    def __post_init__(self) -> None:
        _check_bytes("public_key", self.public_key, KEY_BYTES)
        _check_text("role", self.role, 32)
        _check_text("software_version", self.software_version, 64)
        for name in ("model_version", "round", "uptime_s"):
            _check_u64(name, getattr(self, name))


@dataclass(frozen=True)
class ValidatorRecord:
    """What a validator announces on the DHT (signed; see protocol.discovery)."""

    public_key: bytes
    endpoint: str  # host:port of its gRPC server
    model_version: int
    model_sha256: bytes
    round: int
    domains: tuple[str, ...]
    issued_ms: int
    expires_ms: int

    def __post_init__(self) -> None:
        _check_bytes("public_key", self.public_key, KEY_BYTES)
        _check_text("endpoint", self.endpoint, MAX_ENDPOINT_BYTES)
        _need(":" in self.endpoint, f"endpoint {self.endpoint!r} must be host:port")
        _check_bytes("model_sha256", self.model_sha256, SHA_BYTES)
        for name in ("model_version", "round", "issued_ms", "expires_ms"):
            _check_u64(name, getattr(self, name))
        _need(self.expires_ms > self.issued_ms, "expires_ms must be after issued_ms")
        _need(isinstance(self.domains, tuple) and len(self.domains) <= MAX_DOMAINS, f"at most {MAX_DOMAINS} domains")
        for d in self.domains:
            check_domain(d)


@dataclass(frozen=True)
class SignedAnnouncement:
    record: bytes  # a serialized ValidatorRecord, exactly the bytes that were signed
    signature: bytes
