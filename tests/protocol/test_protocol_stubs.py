"""The committed gRPC stubs are exactly what grpc_tools generates from protocol/expertmesh.proto."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("expertmesh_pb2.py", "expertmesh_pb2_grpc.py")


def test_stubs_match_proto(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in GENERATED:
        fresh = (tmp_path / name).read_text()
        committed = (REPO / "protocol" / name).read_text()
        assert fresh == committed, f"protocol/{name} is stale: run `make protos` and commit the result"
    assert "from expertmesh.protocol import expertmesh_pb2" in (REPO / "protocol" / GENERATED[1]).read_text()
