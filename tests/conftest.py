import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def gsm8k() -> list[dict]:
    """The first 2,000 GSM8K train records ({"question", "answer"}), from the corpus the package ships."""
    from expertmesh.node.data import read_records
    from expertmesh.node.paths import corpus

    return list(itertools.islice(read_records(corpus("gsm8k_train.jsonl")), 2000))


@pytest.fixture(scope="session")
def write_gsm8k(gsm8k):
    """write_gsm8k(path, n) -> path: the first n of those records as a JSON Lines file."""
    def write(path: Path, n: int) -> Path:
        path.write_text("".join(json.dumps(r) + "\n" for r in gsm8k[:n]))
        return path

    return write


def run_cli(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (this checkout's code, whatever the venv points at)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "expertmesh", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or REPO)


@pytest.fixture
def cli():
    return run_cli
