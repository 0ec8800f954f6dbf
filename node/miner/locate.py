"""Finding the validator: a configured HOST:PORT, or a signed announcement on the hivemind DHT.

The DHT peer is started lazily (once) with nat_port_map=False and loopback listening unless told
otherwise (protocol.discovery); lookups verify every announcement and keep only live ones.
"""
from __future__ import annotations

import logging
import time

from expertmesh.node.miner.config import ValidatorSection

REMEMBER_S = 60.0  # a found endpoint is reused this long (or until a call to it fails): no DHT query per poll


class CannotTakePart(Exception):
    """Why the miner cannot work on a round right now; `reason` is a short label for metrics."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Locator:
    def __init__(self, cfg: ValidatorSection, domain: str):
        self.cfg, self.domain = cfg, domain
        self._dht = None
        self._found: tuple[str, float] | None = None

    def forget(self) -> None:
        """The last endpoint failed: look it up again next time."""
        self._found = None

    def find(self) -> str:
        """HOST:PORT of a validator that scores this miner's domain; CannotTakePart if none is found."""
        if self.cfg.address:
            return self.cfg.address
        if self._found is not None and time.monotonic() - self._found[1] < REMEMBER_S:
            return self._found[0]
        from expertmesh.protocol.discovery import find_validators

        self.join()
        try:
            records = find_validators(self._dht, config=self._config())
        except TimeoutError:
            raise CannotTakePart("dht", "DHT lookup timed out; retrying") from None
        if not records:
            raise CannotTakePart("no_validator", "no validator announced on the DHT yet")
        ours = [r for r in records if self.domain in r.domains]
        if not ours:
            seen = sorted({d for r in records for d in r.domains})
            raise CannotTakePart("domain", f"no validator scores domain {self.domain!r} yet (announced domains: "
                                 f"{seen}); a validator scores a domain once its operator enables it (scoring.domains) and a "
                                 "dataset is registered (`expertmesh dataset submit`)")
        self._found = (ours[0].endpoint, time.monotonic())
        return ours[0].endpoint

    def _config(self):
        from expertmesh.protocol.discovery import DiscoveryConfig

        return DiscoveryConfig(initial_peers=tuple(self.cfg.initial_peers), timeout_s=self.cfg.call_timeout_s)

    def join(self) -> None:
        """Start the local DHT peer (when discovery is by DHT). Call it early: hivemind forks its process,
        which is safe only before gRPC and the metrics server start their threads."""
        if self.cfg.address or self._dht is not None:
            return
        from expertmesh.protocol.discovery import start_dht

        logging.getLogger("hivemind").setLevel(logging.WARNING)
        try:
            self._dht = start_dht(self._config())
        except Exception as exc:  # hivemind raises several types when no peer answers
            raise CannotTakePart("dht", f"cannot join the DHT through {list(self.cfg.initial_peers)}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    def close(self) -> None:
        if self._dht is not None:
            self._dht.shutdown()
            self._dht = None
