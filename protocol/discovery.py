"""Finding validators on the hivemind DHT: signed, expiring announcements.

A validator stores, under the DHT key VALIDATORS_KEY and the subkey of its own key id, a
SignedAnnouncement: a serialized ValidatorRecord and an Ed25519 signature over ANNOUNCE_PREFIX ||
record. Readers trust nothing the DHT returns: every entry is verified (signature, subkey == signer,
expiry, bounded lifetime) and the rest dropped. Our DHT peers also refuse to store entries under that
key that do not verify (AnnouncementValidator), so a forged entry cannot displace a real one on them;
plain hivemind peers store anything, which is why lookups verify again.

hivemind is always started with nat_port_map=False: its default asks the LAN's router for a port
mapping over UPnP, traffic that must never leave this machine unasked.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import hivemind
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer

from expertmesh.protocol import identity, serde
from expertmesh.protocol.errors import ProtocolError, StaleTimestamp
from expertmesh.protocol.types import SignedAnnouncement, ValidatorRecord

log = logging.getLogger(__name__)
VALIDATORS_KEY = "expertmesh/v1/validators"
ANNOUNCE_PREFIX = b"expertmesh/v1/announce|"
MAX_ANNOUNCEMENT_BYTES = 8192
_VALIDATORS_KEY_ID = DHTID.generate(source=VALIDATORS_KEY).to_bytes()


@dataclass(frozen=True)
class DiscoveryConfig:
    initial_peers: tuple[str, ...] = ()  # multiaddrs of bootstrap peers (`expertmesh bootstrap` prints them)
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)  # loopback unless told otherwise
    announce_maddrs: tuple[str, ...] = ()
    record_ttl_s: float = 300.0  # how long one announcement stays valid; re-announce before it ends
    max_record_ttl_s: float = 3600.0  # readers drop announcements that claim to live longer than this
    timeout_s: float = 30.0  # deadline of each DHT store/get
    start_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 1.0 <= self.record_ttl_s <= self.max_record_ttl_s <= 86_400:
            raise ValueError("need 1 <= record_ttl_s <= max_record_ttl_s <= 86400 seconds")
        if not 0 < self.timeout_s <= 600 or not 0 < self.start_timeout_s <= 600:
            raise ValueError("timeout_s and start_timeout_s must be within (0, 600] seconds")
        if not self.host_maddrs:
            raise ValueError("host_maddrs needs at least one multiaddr to listen on, e.g. /ip4/127.0.0.1/tcp/0")


def sign_announcement(key: Ed25519PrivateKey, record: ValidatorRecord) -> SignedAnnouncement:
    if identity.public_bytes(key) != record.public_key:
        raise ValueError("record.public_key is not the signing key's public key")
    body = serde.validator_record_to_bytes(record)
    return SignedAnnouncement(record=body, signature=identity.sign(key, ANNOUNCE_PREFIX + body))


def verify_announcement(signed: SignedAnnouncement, *, now_ms: int, max_ttl_s: float) -> ValidatorRecord:
    """The record if the signature verifies and it is live now; ProtocolError subclasses otherwise."""
    record = serde.validator_record_from_bytes(signed.record)
    identity.verify(record.public_key, signed.signature, ANNOUNCE_PREFIX + signed.record)
    if record.expires_ms <= now_ms:
        raise StaleTimestamp("announcement has expired")
    if record.issued_ms > now_ms + 60_000 or record.expires_ms - record.issued_ms > max_ttl_s * 1000:
        raise StaleTimestamp("announcement is issued in the future or claims too long a lifetime")
    return record


def _decode_entry(subkey, value, now_ms: int, max_ttl_s: float) -> ValidatorRecord:
    if not isinstance(value, bytes) or len(value) > MAX_ANNOUNCEMENT_BYTES:
        raise ProtocolError("announcement is not bytes of a bounded size")
    record = verify_announcement(serde.signed_announcement_from_bytes(value), now_ms=now_ms, max_ttl_s=max_ttl_s)
    if subkey != identity.key_id(record.public_key):
        raise ProtocolError("announcement stored under another validator's subkey")
    return record


class AnnouncementValidator(RecordValidatorBase):
    """hivemind record validator: under VALIDATORS_KEY, store and return only verifying announcements."""

    def __init__(self, max_ttl_s: float = 3600.0):
        self.max_ttl_s = max_ttl_s

    def validate(self, record: DHTRecord) -> bool:
        if record.key != _VALIDATORS_KEY_ID:
            return True  # not ours to judge
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
            parsed = _decode_entry(subkey, value, int(time.time() * 1000), self.max_ttl_s)
        except Exception as exc:  # msgpack raises many types on hostile bytes; any failure means "refuse"
            log.debug("refusing DHT announcement: %s", exc)
            return False
        return record.expiration_time <= parsed.expires_ms / 1000 + 1.0  # no longer life than signed


_dht_parent: int | None = None  # set while hivemind forks its DHT process (see _die_with_parent)


def _die_with_parent() -> None:
    """In hivemind's forked DHT process: be killed when the node that forked it dies, however it dies.

    Without this a validator or miner killed with kill -9 leaves its DHT process (and that one's
    p2pd) running for good; the DHT process keeps nothing on disk, so SIGKILL loses nothing.
    """
    global _dht_parent
    parent, _dht_parent = _dht_parent, None  # once: not again in this process's own children
    if parent is None or sys.platform != "linux":
        return
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


os.register_at_fork(after_in_child=_die_with_parent)


def start_dht(config: DiscoveryConfig = DiscoveryConfig(), identity_key: Ed25519PrivateKey | None = None) -> hivemind.DHT:
    """A DHT peer with our announcement validator; `identity_key` fixes its libp2p peer id.

    Call it from a thread that lives as long as the peer: the DHT process dies with that thread.
    """
    global _dht_parent
    kwargs = dict(initial_peers=list(config.initial_peers), host_maddrs=list(config.host_maddrs),
                  nat_port_map=False, record_validators=[AnnouncementValidator(config.max_record_ttl_s)],
                  startup_timeout=config.start_timeout_s, start=True)
    if config.announce_maddrs:
        kwargs["announce_maddrs"] = list(config.announce_maddrs)
    _dht_parent = os.getpid()
    try:
        if identity_key is None:
            return hivemind.DHT(**kwargs)
        with tempfile.TemporaryDirectory(prefix="expertmesh-id-") as tmp:
            # p2pd reads its identity once at start; the converted key lives only until then, mode 0600.
            path = Path(tmp) / "libp2p.key"
            write_libp2p_identity(identity_key, path)
            return hivemind.DHT(identity_path=str(path), check_if_identity_free=False, **kwargs)
    except (P2PDaemonError, TimeoutError) as exc:  # a bad multiaddr, an unreachable bootstrap peer, a busy port
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DiscoveryError(f"cannot start the DHT peer ({detail}); check initial_peers and the listen "
                             "multiaddrs (`expertmesh bootstrap` prints a bootstrap peer's)") from None
    finally:
        _dht_parent = None


class DiscoveryError(ProtocolError):
    """The local DHT peer could not start or join: a configuration problem, not a peer's."""


def write_libp2p_identity(key: Ed25519PrivateKey, path: Path) -> None:
    """The same Ed25519 key in libp2p's protobuf key format (seed || public key), for p2pd."""
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.Ed25519, data=seed + identity.public_bytes(key))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.SerializeToString())


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    return [str(m) for m in dht.get_visible_maddrs()]


def announce_validator(dht: hivemind.DHT, key: Ed25519PrivateKey, record: ValidatorRecord,
                       config: DiscoveryConfig = DiscoveryConfig()) -> bool:
    """Store a signed announcement; True when at least one peer took it. Re-announce before it expires."""
    signed = sign_announcement(key, record)
    future = dht.store(VALIDATORS_KEY, serde.signed_announcement_to_bytes(signed), record.expires_ms / 1000,
                       subkey=identity.key_id(record.public_key), return_future=True)
    return bool(future.result(timeout=config.timeout_s))


def new_record(key: Ed25519PrivateKey, *, endpoint: str, model_version: int, model_sha256: bytes, round: int,
               domains: tuple[str, ...], ttl_s: float) -> ValidatorRecord:
    now_ms = int(time.time() * 1000)
    return ValidatorRecord(public_key=identity.public_bytes(key), endpoint=endpoint, model_version=model_version,
                           model_sha256=model_sha256, round=round, domains=tuple(domains), issued_ms=now_ms,
                           expires_ms=now_ms + int(ttl_s * 1000))


def find_validators(dht: hivemind.DHT, *, domain: str | None = None,
                    config: DiscoveryConfig = DiscoveryConfig()) -> list[ValidatorRecord]:
    """Every live, verifying validator announcement (of `domain` if given), newest round first."""
    found = dht.get(VALIDATORS_KEY, latest=True, return_future=True).result(timeout=config.timeout_s)
    entries = found.value if found is not None else {}
    if not isinstance(entries, dict):
        return []
    now_ms = int(time.time() * 1000)
    records = []
    for subkey, item in entries.items():
        value = getattr(item, "value", item)
        try:
            record = _decode_entry(subkey, value, now_ms, config.max_record_ttl_s)
        except ProtocolError as exc:
            log.info("ignoring DHT announcement under %r: %s", str(subkey)[:80], exc)
            continue
        if domain is None or domain in record.domains:
            records.append(record)
    return sorted(records, key=lambda r: (-r.round, -r.model_version, r.endpoint))


__all__ = ["DiscoveryConfig", "AnnouncementValidator", "start_dht", "announce_validator", "find_validators",
           "new_record", "sign_announcement", "verify_announcement", "visible_maddrs", "write_libp2p_identity"]
