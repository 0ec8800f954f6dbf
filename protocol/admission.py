"""Admission at the edge: everything checked on an upload's first frame, before any payload is read.

Order matters: the signature is checked first, so every later check (and every entry put in the
replay table) concerns an authenticated sender; the timestamp window is checked before the nonce,
so the replay table only ever holds nonces from inside the window and stays bounded.

Replay versus resubmission (docs/protocol.md): nonces are remembered per (key, nonce) together with
the digest of the signed header. The same nonce under a different header is a replay (rejected);
the same signed header again is a resubmission (a retry after a broken stream, or a replay of the
exact bytes), passed on flagged, and backends answer a known digest idempotently, never twice.
"""
from __future__ import annotations

import heapq
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from expertmesh.protocol import envelope as envelope_mod
from expertmesh.protocol.errors import BannedKey, KeyOverloaded, Oversize, ReplayedNonce, StaleTimestamp, UnknownKey
from expertmesh.protocol.identity import key_id, parse_key_id
from expertmesh.protocol.types import SignedEnvelope, Submission


@dataclass(frozen=True)
class AdmissionConfig:
    timestamp_window_s: float = 300.0  # accepted clock skew either way; also how long nonces are kept
    max_tracked_nonces: int = 100_000  # bound on the replay table; when full, its oldest entries are forgotten
    max_nonces_per_key: int = 1_000  # one key's share of it; beyond, that key alone is refused
    max_payload_bytes: dict[str, int] = field(default_factory=lambda: {"delta": 1 << 30, "dataset": 4 << 30})

    def __post_init__(self) -> None:
        if not 1.0 <= self.timestamp_window_s <= 86_400:
            raise ValueError(f"timestamp_window_s={self.timestamp_window_s} must be within [1, 86400] seconds")
        if not 1 <= self.max_tracked_nonces <= 10_000_000:
            raise ValueError(f"max_tracked_nonces={self.max_tracked_nonces} must be within [1, 10^7]")
        if not 1 <= self.max_nonces_per_key <= self.max_tracked_nonces:
            raise ValueError(f"max_nonces_per_key={self.max_nonces_per_key} must be within [1, max_tracked_nonces]")
        if set(self.max_payload_bytes) != set(envelope_mod.PAYLOAD_KINDS):
            raise ValueError(f"max_payload_bytes needs exactly the kinds {sorted(envelope_mod.PAYLOAD_KINDS)}")
        if any(not 1 <= v <= 1 << 40 for v in self.max_payload_bytes.values()):
            raise ValueError("max_payload_bytes values must be within [1 byte, 1 TiB]")


class KeyPolicy:
    """Who may upload: an optional allow list (None: any key) and a deny list that can grow at runtime."""

    def __init__(self, allow: frozenset[bytes] | None = None, deny: frozenset[bytes] = frozenset()):
        self._allow = allow
        self._deny = set(deny)
        self._lock = threading.Lock()

    @classmethod
    def from_files(cls, allow_file: Path | None = None, deny_file: Path | None = None) -> "KeyPolicy":
        """Key ids one per line ('#' starts a comment); no allow file means any key not denied."""
        allow = frozenset(_read_key_ids(allow_file)) if allow_file is not None else None
        deny = frozenset(_read_key_ids(deny_file)) if deny_file is not None else frozenset()
        return cls(allow, deny)

    def listed(self, public_key: bytes) -> bool:
        """On the allow list (False when there is none: no key is vouched for by its operator)."""
        return self._allow is not None and public_key in self._allow

    def ban(self, public_key: bytes) -> None:
        with self._lock:
            self._deny.add(public_key)

    def check(self, public_key: bytes) -> None:
        with self._lock:
            banned = public_key in self._deny
        if banned:
            raise BannedKey(f"key {key_id(public_key)} is banned by this node")
        if self._allow is not None and public_key not in self._allow:
            raise UnknownKey(f"key {key_id(public_key)} is not on this node's allow list; ask its operator to add it")


def _read_key_ids(path: Path) -> list[bytes]:
    keys = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                keys.append(parse_key_id(text))
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: {exc}") from None
    return keys


class ReplayGuard:
    """(key, nonce) -> header digest for admitted envelopes still inside the timestamp window.

    Bounded per key and in all. An envelope is recorded only once the backend has taken it (commit,
    upload or registration done), so refused envelopes never fill the table; one key over its share
    is refused alone; and a full table forgets its oldest entries instead of refusing anyone: a
    forgotten envelope replayed is still answered idempotently by digest (the backends never take a
    known digest twice), so forgetting costs no safety, only the duplicate-nonce check for it.
    """

    def __init__(self, window_s: float, max_entries: int, max_per_key: int | None = None):
        self._window_ms = int(window_s * 1000)
        self._max = max_entries
        self._max_per_key = max_per_key or max_entries
        self._seen: dict[tuple[bytes, bytes], bytes] = {}
        self._per_key: dict[bytes, int] = {}
        self._expiry: list[tuple[int, tuple[bytes, bytes]]] = []  # min-heap by forget-after time
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, public_key: bytes, nonce: bytes, digest: bytes, now_ms: int) -> bool:
        """True when this exact signed header was already recorded (a resubmission); nothing is recorded."""
        with self._lock:
            self._forget(lambda expiry: expiry < now_ms)
            known = self._seen.get((public_key, nonce))
            if known is not None:
                if known != digest:
                    raise ReplayedNonce(f"replayed nonce {nonce.hex()} from key {key_id(public_key)[:16]}…: "
                                        "it was already used for a different envelope; sign with a fresh nonce")
                return True
            if self._per_key.get(public_key, 0) >= self._max_per_key:
                raise KeyOverloaded(f"key {key_id(public_key)[:16]}… has {self._max_per_key} envelopes inside the "
                                    "timestamp window already; send fewer, and retry in a minute")
            return False

    def record(self, public_key: bytes, nonce: bytes, digest: bytes, timestamp_ms: int) -> None:
        slot = (public_key, nonce)
        with self._lock:
            if slot in self._seen:
                return
            if len(self._seen) >= self._max:
                self._forget(lambda _: len(self._seen) >= self._max)  # the soonest to expire go first
            self._seen[slot] = digest
            self._per_key[public_key] = self._per_key.get(public_key, 0) + 1
            # Once the timestamp leaves the window, the window check alone rejects this envelope.
            heapq.heappush(self._expiry, (timestamp_ms + self._window_ms, slot))

    def check_and_record(self, public_key: bytes, nonce: bytes, digest: bytes, timestamp_ms: int, now_ms: int) -> bool:
        seen = self.check(public_key, nonce, digest, now_ms)
        if not seen:
            self.record(public_key, nonce, digest, timestamp_ms)
        return seen

    def _forget(self, due) -> None:
        while self._expiry and due(self._expiry[0][0]):
            _, slot = heapq.heappop(self._expiry)
            if self._seen.pop(slot, None) is not None:
                n = self._per_key[slot[0]] - 1
                if n:
                    self._per_key[slot[0]] = n
                else:
                    del self._per_key[slot[0]]


class Admission:
    """Runs every first-frame check for one server; thread-safe.

    `verify` before the backend's own cheap checks (round open, domain, quota, commitment), `record`
    once the backend took the envelope: so an envelope that is refused leaves nothing behind.
    """

    def __init__(self, config: AdmissionConfig, policy: KeyPolicy | None = None):
        self.config = config
        self.policy = policy or KeyPolicy()
        self.replay = ReplayGuard(config.timestamp_window_s, config.max_tracked_nonces, config.max_nonces_per_key)

    def verify(self, kind: str, signed: SignedEnvelope, now_ms: int | None = None) -> Submission:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        env = envelope_mod.open_envelope(kind, signed)  # MalformedEnvelope / BadSignature
        self.policy.check(env.public_key)
        skew_s = (env.timestamp_ms - now_ms) / 1000
        if abs(skew_s) > self.config.timestamp_window_s:
            raise StaleTimestamp(f"envelope timestamp is {skew_s:+.0f}s from this node's clock, outside "
                                 f"±{self.config.timestamp_window_s:.0f}s; check the sender's clock and re-sign")
        limit = self.config.max_payload_bytes["delta" if kind == "commit" else kind]  # a commit announces a delta
        if env.payload_size > limit:
            raise Oversize(f"{kind} payload of {env.payload_size} bytes exceeds this node's limit of {limit} bytes")
        digest = envelope_mod.digest(kind, signed.body)
        seen = self.replay.check(env.public_key, env.nonce, digest, now_ms)
        return Submission(kind=kind, envelope=env, signature=signed.signature, digest=digest, resubmission=seen)

    def record(self, sub: Submission) -> None:
        self.replay.record(sub.envelope.public_key, sub.envelope.nonce, sub.digest, sub.envelope.timestamp_ms)

    def admit(self, kind: str, signed: SignedEnvelope, now_ms: int | None = None) -> Submission:
        """verify and record at once, for a caller with nothing to check in between."""
        sub = self.verify(kind, signed, now_ms)
        self.record(sub)
        return sub
