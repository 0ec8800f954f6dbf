"""The committed gRPC stubs are exactly what grpc_tools generates from protocol/expertmesh.proto."""
from __future__ import annotations

import shutil
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("expertmesh_pb2.py", "expertmesh_pb2_grpc.py")


def test_stubs_match_proto(tmp_path):
    (tmp_path / "protocol").mkdir()
    shutil.copy(REPO / "protocol" / "expertmesh.proto", tmp_path / "protocol" / "expertmesh.proto")
    rc = protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                      str(tmp_path / "protocol" / "expertmesh.proto")])
    assert rc == 0
    for name in GENERATED:
        fresh = (tmp_path / "protocol" / name).read_text()
        committed = (REPO / "protocol" / name).read_text()
        assert fresh == committed, f"protocol/{name} is stale: run `make protos` and commit the result"
