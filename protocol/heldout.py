"""Held-out membership: one rule for every node, at the fraction the validator states in its round.

A record is held out when the first 48 bits of its content's sha256 fall below `fraction` of their
range, so any node can tell train from held-out records without asking; validators score on the
held-out part and serve only the train part, and miners never train on a held-out record, even
from their own copy of a dataset. The fraction is the validator's (`RoundInfo.heldout_fraction`).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

DEFAULT_FRACTION = 0.05  # a validator's default (datasets.heldout_fraction); local runs use it too


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_heldout(text: str, fraction: float) -> bool:
    return int(content_hash(text)[:12], 16) < fraction * 16**12


def split(texts: Iterable[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, heldout), deduplicated by content, in first-seen order."""
    train: list[str] = []
    heldout: list[str] = []
    seen: set[str] = set()
    for text in texts:
        h = content_hash(text)
        if h in seen:
            continue
        seen.add(h)
        (heldout if is_heldout(text, fraction) else train).append(text)
    return train, heldout
