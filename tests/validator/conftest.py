"""Fixtures for the validator tests: the shipped model, math data, a real trained delta, a node builder."""
from __future__ import annotations

import pytest

from valhelpers import build_test_node, one_torch_thread, train_delta  # noqa: F401 (an autouse fixture)


@pytest.fixture(scope="session")
def math_texts(gsm8k) -> list[str]:
    from expertmesh.node.domains import MATH_TEMPLATE

    return [MATH_TEMPLATE.format(**r) for r in gsm8k]


@pytest.fixture(scope="session")
def math_payload(tmp_path_factory, math_texts):
    """A dataset registration payload (JSON Lines of {"text": ...}) of the math texts."""
    from expertmesh.validator.registry import write_payload

    return write_payload(math_texts, tmp_path_factory.mktemp("data") / "math.jsonl")


@pytest.fixture(scope="session")
def trained(math_texts):
    """A real delta: route-profiled expert selection on the shipped model, then trainer steps on math."""
    return train_delta(math_texts)


@pytest.fixture(scope="session")
def trained_other(math_texts):
    """A second miner's delta: the other half of the math texts, its own seed (not a copy of `trained`)."""
    return train_delta(math_texts[len(math_texts) // 2:], seed=1)


@pytest.fixture
def make_node(tmp_path):
    nodes = []

    def make(name: str = "state", **sections):
        nodes.append(build_test_node(tmp_path / name, **sections))
        return nodes[-1]

    yield make
    for n in nodes:
        n.ledger.close()
