"""Canonical expert tensor names, shared by the wire, delta files and every node.

An expert is addressed by (layer, expert). On the wire and in delta files each expert is three
tensors in the per-expert layout transformers writes on disk:
  layers.<l>.experts.<e>.gate_proj  [I, H]
  layers.<l>.experts.<e>.up_proj    [I, H]
  layers.<l>.experts.<e>.down_proj  [H, I]
"""
from __future__ import annotations

import re

PROJS = ("gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^layers\.(0|[1-9][0-9]{0,5})\.experts\.(0|[1-9][0-9]{0,5})\.(gate_proj|up_proj|down_proj)$")


def expert_key(layer: int, expert: int, proj: str) -> str:
    assert proj in PROJS, proj
    return f"layers.{layer}.experts.{expert}.{proj}"


def parse_expert_key(key: str) -> tuple[int, int, str]:
    """(layer, expert, proj) of a canonical name; ValueError for anything else."""
    m = _KEY.fullmatch(key) if isinstance(key, str) else None  # fullmatch: '$' would accept a trailing newline
    if m is None:
        raise ValueError(f"not a canonical expert tensor name: {key!r} (want layers.<l>.experts.<e>.<gate_proj|up_proj|down_proj>)")
    return int(m.group(1)), int(m.group(2)), m.group(3)
