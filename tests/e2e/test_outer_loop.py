"""The outer loop keeps what a miner learns: five rounds of one math miner, each published version no
worse than its parent on math's held-out rows.

The demo's yardstick is the validator's own scoring rows (same held-out split, same eval_tokens), so
a version worse than its parent would mean the merge threw away what the accepted delta gained.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]
REPO = Path(__file__).resolve().parents[2]


def test_five_single_miner_rounds_never_lose_math(tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run([sys.executable, "-m", "expertmesh", "demo", "--rounds", "5", "--miners", "1",
                           "--eval-tokens", "4096", "--json", str(out), "--run-dir", str(tmp_path / "run"),
                           "--timeout", "1300"], capture_output=True, text=True, cwd=REPO, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    math = [doc["base_domain_loss"]["math"]] + [r["domain_loss"]["math"] for r in doc["rounds"]]
    print("math held-out loss per version:", math)
    assert [r["version"] for r in doc["rounds"]] == [1, 2, 3, 4, 5], proc.stdout[-3000:]
    worse = [(v, math[v - 1], math[v]) for v in range(1, len(math)) if math[v] > math[v - 1]]
    assert not worse, f"published versions worse than their parent on math (version, parent, new): {worse}"
