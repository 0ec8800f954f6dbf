"""A child process for the cache tests: `python cachechild.py ROOT ADDRESS VERSION SHA_HEX [--stall NAME]`.

Runs the real CheckpointCache.ensure against a real validator and prints `fetched NAME` for every
file it downloads, then `ready DIR`. With --stall, the download of NAME stops after its first
frame (a real spool file is on disk by then), prints `stalled NAME` and waits to be killed.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from expertmesh.node.fetch import CheckpointCache
from expertmesh.protocol.client import ValidatorClient


class Client(ValidatorClient):
    stall: str | None = None

    def fetch_checkpoint_file(self, ref, out_path, expected_sha256=None):
        print(f"fetching {ref.name}", flush=True)
        header = super().fetch_checkpoint_file(ref, out_path, expected_sha256)
        print(f"fetched {ref.name}", flush=True)
        return header

    def _download(self, method, rpc, request, out_path, max_bytes, expected_sha256):
        if self.stall is None or Path(out_path).name != self.stall:
            return super()._download(method, rpc, request, out_path, max_bytes, expected_sha256)

        def stalled(req, timeout):  # the real stream, cut after its first frame
            call = rpc(req, timeout=timeout)
            yield next(call)
            spooled = list(Path(out_path).parent.glob("upload-*.part"))
            print(f"stalled {self.stall} after {sum(p.stat().st_size for p in spooled)} bytes", flush=True)
            time.sleep(3600)

        return super()._download(method, stalled, request, out_path, max_bytes, expected_sha256)


def main() -> None:
    root, address, version, sha = sys.argv[1:5]
    with Client(address) as client:
        if "--stall" in sys.argv:
            client.stall = sys.argv[sys.argv.index("--stall") + 1]
        directory = CheckpointCache(Path(root)).ensure(client, int(version), bytes.fromhex(sha))
    print(f"ready {directory}", flush=True)


if __name__ == "__main__":
    main()
