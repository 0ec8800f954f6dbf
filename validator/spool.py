"""Submission payloads on disk: one file per accepted submission, named by its digest, per round.

Uploads are streamed to disk by the transport (bounded memory, size and sha256 checked on the way)
into `incoming/`, on the same filesystem, so taking one is an atomic rename plus fsyncs. A payload
file exists before its ledger row does; files without a row (a crash in between) are swept at
start, and a round's files are dropped once the round is finished.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from expertmesh.protocol.files import fsync_path

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class Spool:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)

    def store(self, src: Path, round_number: int, digest: str) -> str:
        """Move an uploaded file into the spool; returns its path relative to the spool root."""
        assert _DIGEST.match(digest), digest
        rel = f"r{round_number}/{digest}.delta"
        dst = self.root / rel
        dst.parent.mkdir(exist_ok=True)
        fsync_path(src)
        os.replace(src, dst)
        fsync_path(dst.parent)
        return rel

    def path(self, rel: str) -> Path:
        return self.root / rel

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def sweep(self, known: set[str]) -> list[str]:
        """Remove payloads not in `known` (no ledger row: a crash before the receipt; or a finished
        round's: a crash before its folder was dropped), empty round folders and stale partial
        uploads; the names removed."""
        removed = []
        for f in sorted(self.root.glob("r*/*.delta")):
            rel = f.relative_to(self.root).as_posix()
            if rel not in known:
                f.unlink()
                removed.append(rel)
        for d in self.root.glob("r*/"):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        for f in self.incoming.iterdir():
            f.unlink()
            removed.append(f.relative_to(self.root).as_posix())
        return removed

    def drop_round(self, round_number: int) -> None:
        shutil.rmtree(self.root / f"r{round_number}", ignore_errors=True)
