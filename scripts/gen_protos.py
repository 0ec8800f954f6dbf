"""Generate the gRPC stubs of protocol/expertmesh.proto: `make protos` (a test checks the committed ones).

protoc names a stub's imports after the proto's path under its include root, so the proto is
compiled from a scratch tree as expertmesh/protocol/expertmesh.proto: the stubs then import
`expertmesh.protocol.expertmesh_pb2`, the installed name.

    python scripts/gen_protos.py [--out DIR]   (default: protocol/, in place)
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTOCOL = Path(__file__).resolve().parent.parent / "protocol"
GENERATED = ("expertmesh_pb2.py", "expertmesh_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "expertmesh" / "protocol"
        pkg.mkdir(parents=True)
        shutil.copy(PROTOCOL / "expertmesh.proto", pkg / "expertmesh.proto")
        rc = protoc.main(["protoc", f"-I{tmp}", f"--python_out={tmp}", f"--grpc_python_out={tmp}",
                          str(pkg / "expertmesh.proto")])
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        out.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy(pkg / name, out / name)) for name in GENERATED]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTOCOL)
    for path in generate(parser.parse_args(argv).out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
