"""A DHT peer that cannot start is a one-line configuration error, not a hivemind traceback."""
import pytest

from expertmesh.protocol.discovery import DiscoveryConfig, DiscoveryError, start_dht


@pytest.mark.parametrize("peer, match", [("garbage", "multiaddr"),
                                         ("/ip4/127.0.0.1/tcp/1/p2p/12D3KooWQRy5a7DgfZRaNuhZLfyorGH8QJnDJeJpY71tGK5QeZzi",
                                          "bootstrap")])
def test_bad_initial_peer_is_a_discovery_error(peer, match):
    with pytest.raises(DiscoveryError, match=match) as err:
        start_dht(DiscoveryConfig(initial_peers=(peer,), start_timeout_s=20))
    assert isinstance(err.value, ValueError) and "initial_peers" in str(err.value)
