"""Fixtures for the protocol tests: a live server on 127.0.0.1:0 around MemoryBackend, keys, a tiny delta."""
from __future__ import annotations

import pytest

from expertmesh.protocol import identity
from expertmesh.protocol.client import ClientConfig, ValidatorClient
from expertmesh.protocol.codec import CodecConfig, DeltaMeta, encode_delta
from expertmesh.protocol.server import ServerConfig, ValidatorServer

from protohelpers import FAST, MemoryBackend, make_delta, signed


@pytest.fixture
def backend(tmp_path) -> MemoryBackend:
    root = tmp_path / "backend"
    root.mkdir()
    return MemoryBackend(root)


@pytest.fixture
def make_server(backend, tmp_path):
    servers = []

    def make(config: ServerConfig = FAST, policy=None) -> ValidatorServer:
        servers.append(ValidatorServer(backend, config, policy))
        return servers[-1]

    yield make
    for s in servers:
        s.stop(0)


@pytest.fixture
def server(make_server) -> ValidatorServer:
    return make_server()


@pytest.fixture
def client(server):
    with ValidatorClient(server.address, ClientConfig(call_timeout_s=5, upload_timeout_s=10)) as c:
        yield c


@pytest.fixture(scope="session")
def miner_key():
    return identity.generate_key()


@pytest.fixture(scope="session")
def delta_payload() -> bytes:
    enc = encode_delta(make_delta({0: [1, 3], 1: [7]}), DeltaMeta(1, 4096, "ab" * 32), CodecConfig("int8", block=64))
    return enc.payload


@pytest.fixture
def sign():
    """sign(key, payload, kind="delta", **envelope fields) -> a fresh SignedEnvelope for the test backend."""
    return lambda key, payload, kind="delta", **overrides: signed(kind, key, payload, **overrides)


@pytest.fixture
def assert_serves(client, miner_key, delta_payload, sign, backend):
    """After a refusal: the same server still takes a good submission."""

    def check(key=None) -> None:
        before = backend.accept_calls
        receipt = client.submit_delta(delta_payload, sign(key or miner_key, delta_payload))
        assert receipt.payload_bytes == len(delta_payload) and backend.accept_calls == before + 1

    return check
