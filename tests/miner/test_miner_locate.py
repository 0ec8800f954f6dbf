"""Finding the validator on a real hivemind DHT (loopback, nat_port_map=False): signed announcements only."""
from __future__ import annotations

import pytest

from expertmesh.node.miner.config import ValidatorSection
from expertmesh.node.miner.locate import CannotTakePart, Locator
from expertmesh.protocol import identity
from expertmesh.protocol.discovery import DiscoveryConfig, announce_validator, new_record, start_dht, visible_maddrs

pytestmark = pytest.mark.slow


def test_locator_finds_the_validator_that_scores_its_domain():
    boot = start_dht(DiscoveryConfig())
    peers = tuple(visible_maddrs(boot))
    found = []
    try:
        empty = Locator(ValidatorSection(initial_peers=peers), "math")
        with pytest.raises(CannotTakePart, match="no validator announced"):
            empty.find()
        key = identity.generate_key()
        record = new_record(key, endpoint="127.0.0.1:4242", model_version=3, model_sha256=b"\x07" * 32, round=5,
                            domains=("math", "literature"), ttl_s=60)
        assert announce_validator(boot, key, record)
        found.append(empty.find())
        code = Locator(ValidatorSection(initial_peers=peers), "code")
        with pytest.raises(CannotTakePart, match=r"no validator scores domain 'code' yet .*'literature', 'math'"):
            code.find()
        code.close()
        empty.close()
    finally:
        boot.shutdown()
    assert found == ["127.0.0.1:4242"]
