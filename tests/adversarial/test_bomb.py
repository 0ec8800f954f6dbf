"""Decompression bomb. Before: a 39,831-byte dataset upload wrote 40,000,360 bytes to disk (x1,004):
the upload and each record were bounded, the decompressed total not. And `dataset submit` read a 50 MB
one-line file whole (240 MB RSS) before refusing it. Now the validator counts decompressed bytes while
it streams (`datasets.max_expansion` x the upload, at most `datasets.max_bytes`), and every reader
holds at most one bounded line."""
import gzip
import json
import subprocess
import sys

import pytest

from arena import fresh_key
from valhelpers import ledger_rows

from expertmesh.protocol import identity
from expertmesh.protocol.errors import RemoteError


def test_a_decompression_bomb_is_refused_while_it_streams(live, tmp_path):
    v = live()
    bomb = tmp_path / "bomb.jsonl.gz"
    with gzip.open(bomb, "wb") as f:
        for i in range(40):  # 40 distinct records of a million bytes each: 40 MB from about 40 KB
            f.write((json.dumps({"text": f"{i} " + "a" * 999_990}) + "\n").encode())
    assert bomb.stat().st_size < 100_000
    with pytest.raises(RemoteError) as err:
        v.register(fresh_key(), bomb, "math", "bomb")
    assert err.value.code == "INVALID_ARGUMENT" and "decompresses to over" in err.value.details, err.value
    assert not [r for r in ledger_rows(v.state, "SELECT * FROM datasets") if r["name"] == "bomb"]
    assert not list((v.state / "datasets").glob(".tmp-*"))


def test_dataset_submit_refuses_a_huge_line_in_bounded_memory(tmp_path):
    big = tmp_path / "one-line.jsonl"
    with open(big, "w") as f:  # 50 MB on one line
        f.write('{"text": "' + "b" * (50 << 20) + '"}\n')
    identity.save_key(fresh_key(), tmp_path / "me.key")
    # The child reports its own peak (VmHWM is reset at exec; a forked child's ru_maxrss counts pytest's pages).
    run_and_report_peak = ("import runpy, sys\nsys.argv[0] = 'expertmesh'\nrc = 0\ntry:\n"
                           "    runpy.run_module('expertmesh', run_name='__main__')\nexcept SystemExit as e:\n"
                           "    rc = e.code\n"
                           "print(next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')).split()[1])\n"
                           "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", run_and_report_peak, "dataset", "submit", str(big), "--domain", "math",
                          "--validator", "127.0.0.1:1", "--key", str(tmp_path / "me.key")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "over" in lines[0] and "split" in lines[0], out.stderr
    peak_mib = int(out.stdout.split()[-1]) / 1024
    assert peak_mib < 150, f"peak RSS {peak_mib:.0f} MiB reading a 50 MB line"
