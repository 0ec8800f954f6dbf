"""scripts/bench_kernels.py runs end to end without a GPU: its parity cases, and its benchmark loop
on tiny CPU shapes (--smoke), so the GPU-only numbers are produced by code that has at least run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent.parent / "scripts" / "bench_kernels.py"


@pytest.mark.parametrize("args,expect", [
    ([], ["no CUDA GPU", "parity T=1 K=2"]),
    (["--smoke", "--fractions", "0.1", "1.0"], ["| model | T | f |", "goal", "f=0.1 step within 1.1x"]),
], ids=["no_gpu_parity", "smoke"])
def test_bench_script_runs_without_gpu(args, expect):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)  # the script must set it itself
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for text in expect:
        assert text in out.stdout, out.stdout
    assert "FAIL" not in out.stdout
