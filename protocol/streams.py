"""Bulk bytes in 1 MiB pieces: chunking files, spooling uploads and downloads to disk, bounded and hashed.

Nothing here holds a whole payload in memory: received bytes go to a temporary file next to their
destination, counted against a limit as they arrive and hashed on the way, and the file only takes
its final name once size and sha256 match what the sender declared.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

from expertmesh.protocol.errors import Oversize, PayloadMismatch, ProtocolError
from expertmesh.protocol.types import BlobHeader

CHUNK_BYTES = 1 << 20
ENVELOPE_ALLOWANCE = 64 << 10  # room for an envelope and framing on top of a full chunk


def iter_chunks(payload: bytes | Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    if isinstance(payload, bytes):
        for start in range(0, len(payload), chunk_bytes):
            yield payload[start:start + chunk_bytes]
        return
    with open(payload, "rb") as f:
        while piece := f.read(chunk_bytes):
            yield piece


def hash_payload(payload: bytes | Path) -> tuple[bytes, int]:
    """(sha256, size) of a payload given as bytes or as a file."""
    h, size = hashlib.sha256(), 0
    for piece in iter_chunks(payload):
        h.update(piece)
        size += len(piece)
    return h.digest(), size


def spool(pieces: Iterable[bytes], directory: Path, *, expected_size: int, expected_sha256: bytes,
          on_progress: Callable[[int], None] | None = None) -> Path:
    """Write pieces to a new file in `directory`; its path once size and sha256 match, else raise.

    Oversize as soon as more than expected_size bytes arrive (the rest is never read);
    PayloadMismatch when the stream ends short or the hash differs. The file is removed on any error.
    """
    fd, name = tempfile.mkstemp(dir=directory, prefix="upload-", suffix=".part")
    path = Path(name)
    try:
        h, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as f:
            for piece in pieces:
                size += len(piece)
                if size > expected_size:
                    raise Oversize(f"payload exceeds its declared size of {expected_size} bytes")
                h.update(piece)
                f.write(piece)
                if on_progress is not None:
                    on_progress(size)
        if size != expected_size:
            raise PayloadMismatch(f"payload ended after {size} of {expected_size} declared bytes")
        if h.digest() != expected_sha256:
            raise PayloadMismatch("payload hash mismatch: the received bytes' sha256 is not the one signed")
        return path
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def receive_blob(frames: Iterable[tuple[BlobHeader | None, bytes]], out_path: Path, *, max_bytes: int,
                 expected_sha256: bytes | None = None) -> BlobHeader:
    """Download frames into out_path (atomically); the first frame must carry the header.

    The header's size is checked against max_bytes before any byte is written, and its sha256
    against expected_sha256 when the caller knows it from a trusted source (a signed manifest).
    """
    it = iter(frames)
    first = next(it, None)
    if first is None or first[0] is None:
        raise ProtocolError("download did not start with a header frame")
    header, data = first
    if header.size > max_bytes:
        raise Oversize(f"{header.name!r} is {header.size} bytes, over this client's limit of {max_bytes}")
    if expected_sha256 is not None and header.sha256 != expected_sha256:
        raise PayloadMismatch(f"{header.name!r} announced sha256 {header.sha256.hex()}, expected {expected_sha256.hex()}")

    def pieces() -> Iterator[bytes]:
        yield data
        for extra_header, piece in it:
            if extra_header is not None:
                raise ProtocolError("download carried a second header frame")
            yield piece

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = spool(pieces(), out_path.parent, expected_size=header.size, expected_sha256=header.sha256)
    os.replace(tmp, out_path)
    return header
