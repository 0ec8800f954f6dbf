"""Fixtures for the miner and dataset-submission tests: a FakeValidator on a real gRPC server at 127.0.0.1:0."""
from __future__ import annotations

import pytest

from fakevalidator import FakeValidator
from expertmesh.node.paths import DEFAULT_MODEL
from expertmesh.protocol import identity
from expertmesh.protocol.server import ServerConfig, ValidatorServer


@pytest.fixture
def make_fake(tmp_path):
    """make_fake(**ServerConfig fields) -> a FakeValidator served on 127.0.0.1:0 (`.address`)."""
    servers = []

    def make(**server_fields) -> FakeValidator:
        root = tmp_path / f"validator{len(servers)}"
        root.mkdir()
        backend = FakeValidator(root, DEFAULT_MODEL)
        fields = dict(idle_timeout_s=30.0, max_rpc_s=300.0, max_workers=8) | server_fields
        servers.append(ValidatorServer(backend, ServerConfig(**fields)))
        backend.address = servers[-1].address
        return backend

    yield make
    for s in servers:
        s.stop(0)


@pytest.fixture
def fake(make_fake):
    return make_fake()


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "user.key"
    identity.save_key(identity.generate_key(), path)
    return path


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process training here runs beside the test's own servers and children: one thread is faster
    than two contending ones on a small CPU, and it is what the miners run with (train.threads = 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
