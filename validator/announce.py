"""Announcing this validator on the hivemind DHT: a signed, expiring record, refreshed on a timer and on change.

hivemind is started through protocol.discovery, which always passes nat_port_map=False (no UPnP
traffic off the machine). A failed announcement is logged and retried on the next tick; it never
stops the validator.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from expertmesh.protocol.discovery import DiscoveryConfig, announce_validator, new_record, start_dht, visible_maddrs
from expertmesh.validator.config import DhtSection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Announced:
    model_version: int
    model_sha256: bytes
    round: int
    domains: tuple[str, ...]


class Announcer:
    """Joins the DHT at construction and announces once `start` names the endpoint.

    Construct it before the gRPC server and the metrics server exist: hivemind forks its DHT
    process, and a fork while gRPC threads run can leave the child deadlocked (seen in CI as a
    validator hanging before it ever announced).
    """

    def __init__(self, cfg: DhtSection, key: Ed25519PrivateKey):
        self.cfg, self.key = cfg, key
        self.discovery = DiscoveryConfig(initial_peers=cfg.initial_peers, host_maddrs=cfg.host_maddrs,
                                         record_ttl_s=cfg.record_ttl_s, max_record_ttl_s=max(3600.0, cfg.record_ttl_s))
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.dht = start_dht(self.discovery)
        self.maddrs = visible_maddrs(self.dht)
        self._thread: threading.Thread | None = None

    def start(self, endpoint: str, current: Callable[[], Announced]) -> None:
        self.endpoint, self.current = endpoint, current
        self._thread = threading.Thread(target=self._run, name="dht-announce", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def announce_once(self) -> bool:
        now = self.current()
        record = new_record(self.key, endpoint=self.endpoint, model_version=now.model_version,
                            model_sha256=now.model_sha256, round=now.round, domains=now.domains,
                            ttl_s=self.cfg.record_ttl_s)
        return announce_validator(self.dht, self.key, record, self.discovery)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ok = self.announce_once()
                log.info("announced on the DHT" if ok else "no DHT peer stored the announcement",
                         extra={"endpoint": self.endpoint})
            except Exception as exc:  # a DHT hiccup must not stop the validator; the next tick retries
                log.warning("DHT announcement failed: %s", exc)
            self._wake.wait(self.cfg.announce_every_s)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.dht.shutdown()
