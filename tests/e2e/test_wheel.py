"""Installed from a wheel, away from the repository: one top-level package, and the demo still runs.

The wheel is built from this checkout and unpacked into a folder of its own; the demo then runs with
that folder first on the path and the repository nowhere on it, so anything that found its files
through the repository layout would fail here.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]


def test_the_installed_distribution_has_one_top_level_package():
    dist = importlib.metadata.distribution("expertmesh")
    assert (dist.read_text("top_level.txt") or "").split() == ["expertmesh"]
    owners = importlib.metadata.packages_distributions()
    assert sorted(name for name, dists in owners.items() if "expertmesh" in dists) == ["expertmesh"]


def test_a_wheel_installed_elsewhere_runs_the_demo(tmp_path):
    # Built from a copy of the tracked files: a build writes build/ and egg-info beside its sources.
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True).stdout.split()
    for name in tracked:
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tmp_path / "src" / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(tmp_path / "src")], capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stderr
    wheel, = (tmp_path / "dist").glob("expertmesh-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(tmp_path / "site")
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"expertmesh"}
    assert any(n.startswith("expertmesh/node/assets/data/gsm8k_train.jsonl.gz") for n in names)

    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    env.pop("EXPERTMESH_DATA", None)
    where = subprocess.run([sys.executable, "-c", "import expertmesh.node.cli as m; print(m.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert where.stdout.strip().startswith(str(tmp_path / "site")), where.stdout + where.stderr
    run = tmp_path / "run"
    demo = subprocess.run([sys.executable, "-m", "expertmesh", "demo", "--rounds", "1", "--miners", "1",
                           "--steps", "4", "--eval-tokens", "1024", "--run-dir", str(run), "--json",
                           str(tmp_path / "demo.json"), "--timeout", "800"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=850)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    doc = json.loads((tmp_path / "demo.json").read_text())
    assert [r["version"] for r in doc["rounds"]] == [1]
    assert doc["base_model"].startswith(str(tmp_path / "site"))  # the model came from the installed copy
