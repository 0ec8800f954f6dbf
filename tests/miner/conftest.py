"""Fixtures for the miner and dataset-submission tests: a FakeValidator on a real gRPC server at 127.0.0.1:0."""
from __future__ import annotations

import pytest

from fakevalidator import FakeValidator
from node.paths import DEFAULT_MODEL
from protocol import identity
from protocol.server import ServerConfig, ValidatorServer


@pytest.fixture
def fake(tmp_path):
    root = tmp_path / "validator"
    root.mkdir()
    backend = FakeValidator(root, DEFAULT_MODEL)
    server = ValidatorServer(backend, ServerConfig(idle_timeout_s=30.0, max_rpc_s=300.0, max_workers=8))
    backend.address = server.address
    yield backend
    server.stop(0)


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "user.key"
    identity.save_key(identity.generate_key(), path)
    return path
