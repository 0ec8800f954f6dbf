"""Fixtures for the attacks: the public corpora as an attacker has them, honest deltas, a live validator."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import arena as arena_mod  # noqa: E402
from valhelpers import one_torch_thread  # noqa: E402,F401 (autouse: one thread, as the validators under attack)


@pytest.fixture(scope="session")
def math_texts(gsm8k) -> list[str]:
    from expertmesh.node.domains import MATH_TEMPLATE

    return [MATH_TEMPLATE.format(**r) for r in gsm8k]


@pytest.fixture(scope="session")
def literature_texts() -> list[str]:
    """The first 2,000 paragraphs of Tiny Shakespeare (the shipped copy: what everyone has)."""
    from expertmesh.node.data import iter_texts
    from expertmesh.node.paths import corpus

    return list(itertools.islice(iter_texts(corpus("tinyshakespeare.txt")), 2000))


@pytest.fixture(scope="session")
def corpora(tmp_path_factory, math_texts, literature_texts) -> dict[str, Path]:
    from expertmesh.validator.registry import write_payload

    root = tmp_path_factory.mktemp("corpora")
    return {"math": write_payload(math_texts, root / "math.jsonl"),
            "literature": write_payload(literature_texts, root / "literature.jsonl")}


@pytest.fixture(scope="session")
def honest_math(math_texts):
    """An honest math miner's delta: its own half of the data, ESFT selection, 20 AdamW steps."""
    from valhelpers import train_delta

    return train_delta(math_texts[:1000], seed=0)


@pytest.fixture(scope="session")
def second_math(math_texts):
    """A second honest math miner: the other half of the data, its own seed."""
    from valhelpers import train_delta

    return train_delta(math_texts[1000:], seed=1)


@pytest.fixture
def live(tmp_path, corpora):
    """live(**sections) -> a running validator with math and literature preloaded; stopped after the test."""
    started = []

    def start(**sections):
        started.append(arena_mod.start(tmp_path / f"v{len(started)}", corpora, **sections))
        return started[-1]

    yield start
    for a in started:
        arena_mod.stop(a)
