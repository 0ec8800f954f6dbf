"""Fixtures for the miner and dataset-submission tests: the real validator (no scheduler) on a real gRPC
server at 127.0.0.1:0."""
from __future__ import annotations

import pytest

from validatorparts import Validator
from expertmesh.protocol import identity
from expertmesh.protocol.server import ServerConfig, ValidatorServer


@pytest.fixture
def make_validator(tmp_path):
    """make_validator(**ServerConfig fields) -> a Validator served on 127.0.0.1:0 (`.address`)."""
    made = []

    def make(**server_fields) -> Validator:
        val = Validator(tmp_path / f"validator{len(made)}")
        fields = dict(idle_timeout_s=30.0, max_rpc_s=300.0, max_workers=12, max_uploads=4, max_downloads=4,
                      spool_dir=val.node.spool.incoming) | server_fields
        server = ValidatorServer(val, ServerConfig(**fields))
        val.address = server.address
        made.append((val, server))
        return val

    yield make
    for val, server in made:
        server.stop(0)
        val.node.ledger.close()


@pytest.fixture
def validator(make_validator):
    return make_validator()


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
