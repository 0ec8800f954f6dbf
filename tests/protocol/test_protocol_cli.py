"""The protocol's CLI commands, run as real subprocesses: keygen, delta inspect (bootstrap: discovery tests)."""
from __future__ import annotations

import stat

from expertmesh.protocol import identity
from expertmesh.protocol.codec import CodecConfig, DeltaMeta, encode_delta

from protohelpers import make_delta


def test_cli_keygen(cli, tmp_path):
    out = tmp_path / "id.key"
    res = cli("keygen", "--out", str(out))
    assert res.returncode == 0, res.stderr
    kid = res.stdout.strip()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert identity.key_id(identity.public_bytes(identity.load_key(out))) == kid and len(kid) == 64
    again = cli("keygen", "--out", str(out))
    assert again.returncode == 2 and again.stderr.startswith("error:") and "--force" in again.stderr
    assert identity.key_id(identity.public_bytes(identity.load_key(out))) == kid  # untouched


def test_cli_delta_inspect(cli, tmp_path):
    enc = encode_delta(make_delta({0: [1, 3], 1: [7]}), DeltaMeta(3, 12_345, "cd" * 32), CodecConfig("int8", block=64))
    path = tmp_path / "delta.safetensors"
    path.write_bytes(enc.payload)
    res = cli("delta", "inspect", str(path))
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(": ", 1) for line in res.stdout.splitlines() if ": " in line and not line.startswith(" "))
    params = 3 * 3 * 32 * 16
    assert lines["codec"] == "int8 (block 64)" and lines["bytes"] == str(len(enc.payload))
    assert lines["ratio_vs_fp32"].startswith(f"{params * 4 / len(enc.payload):.2f}x")
    assert lines["ratio_vs_fp16"].startswith(f"{params * 2 / len(enc.payload):.2f}x")
    assert "  layer 0: 1 3" in res.stdout and "  layer 1: 7" in res.stdout
    path.write_bytes(b"not a delta at all")
    bad = cli("delta", "inspect", str(path))
    assert bad.returncode == 2 and bad.stderr.startswith("error: invalid delta")
