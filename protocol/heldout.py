"""Held-out membership: which records a validator keeps to score on, and the order it scores them in.

A record is held out when the first 48 bits of a hash of its content fall below `fraction` of their
range. A validator keys that hash with a secret (HMAC-SHA256; `datasets.heldout_key`, never sent),
so nobody else can tell which records of a public dataset it holds out, or which of them it scores
on first (`eval_order`, keyed the same way). Without a key the hash is plain sha256: the split any
node can recompute, which local runs (`expertmesh train`, the benchmarks) use for their own held-out
part. The fraction is the validator's (`RoundInfo.heldout_fraction`).
"""
from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path

DEFAULT_FRACTION = 0.05  # a validator's default (datasets.heldout_fraction); local runs use it too
KEY_BYTES = 32


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _keyed(text: str, key: bytes | None, purpose: bytes) -> bytes:
    data = text.encode("utf-8")
    if key is None:
        return hashlib.sha256(data).digest()
    return hmac.new(key, purpose + data, hashlib.sha256).digest()


def is_heldout(text: str, fraction: float, key: bytes | None = None) -> bool:
    return int.from_bytes(_keyed(text, key, b"expertmesh/heldout|")[:6], "big") < fraction * 2**48


def eval_order(texts: Iterable[str], key: bytes | None) -> list[str]:
    """The texts in the order a validator scores them: by keyed hash (unpredictable without the key)."""
    return sorted(texts, key=lambda t: _keyed(t, key, b"expertmesh/eval-order|"))


def eval_chunk(text: str, key: bytes | None, n_chunks: int) -> int:
    """Which of a held-out record's n_chunks pieces a validator scores on (keyed, so unpredictable)."""
    return int.from_bytes(_keyed(text, key, b"expertmesh/eval-chunk|")[:8], "big") % max(1, n_chunks)


def split(texts: Iterable[str], fraction: float, key: bytes | None = None) -> tuple[list[str], list[str]]:
    """(train, heldout), deduplicated by content, in first-seen order."""
    train: list[str] = []
    heldout: list[str] = []
    seen: set[str] = set()
    for text in texts:
        h = content_hash(text)
        if h in seen:
            continue
        seen.add(h)
        (heldout if is_heldout(text, fraction, key) else train).append(text)
    return train, heldout


def load_or_create_key(path: Path) -> bytes:
    """The validator's held-out secret: 32 random bytes, created once with mode 0600, never overwritten."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a key another process created meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path}: a held-out key is {KEY_BYTES} bytes, this file has {len(key)}; "
                         "restore the validator's key or point datasets.heldout_key at a new path")
    return key
