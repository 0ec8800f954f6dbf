"""The three built-in domains: math (GSM8K), literature (Tiny Shakespeare), code (Python's stdlib).

Used by pretraining, the README experiments and the demo. Each domain is a list of texts and can be
written out as a dataset file, so the demo registers it through the same path a user would.
"""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from expertmesh.node.data import iter_texts
from expertmesh.node.paths import corpus

DOMAINS = ("math", "literature", "code")
MATH_TEMPLATE = "{question}\n{answer}"
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__", "lib2to3", "ensurepip"}


def _code_chunks(source: str, max_chars: int) -> list[str]:
    """Split a module at blank lines into chunks of at most ~max_chars (long blocks stay whole)."""
    chunks, cur = [], ""
    for block in source.split("\n\n"):
        if cur and len(cur) + len(block) + 2 > max_chars:
            chunks.append(cur)
            cur = block
        else:
            cur = f"{cur}\n\n{block}" if cur else block
    if cur.strip():
        chunks.append(cur)
    return [c for c in chunks if c.strip()]


def stdlib_texts(max_chars: int = 1500) -> list[str]:
    """Chunks of the Python standard library's own sources, in a fixed (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts))
    texts: list[str] = []
    for f in files:
        try:
            texts.extend(_code_chunks(f.read_text(encoding="utf-8"), max_chars))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def domain_texts(domain: str) -> list[str]:
    if domain == "math":
        return list(iter_texts(corpus("gsm8k_train.jsonl"), template=MATH_TEMPLATE))
    if domain == "literature":
        return list(iter_texts(corpus("tinyshakespeare.txt")))
    if domain == "code":
        return stdlib_texts()
    raise ValueError(f"unknown domain {domain!r}; built-in domains are {', '.join(DOMAINS)}")


def write_domain_file(domain: str, out: Path, texts: list[str] | None = None) -> Path:
    """A domain as a .jsonl file of {"text": ...} records."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for t in texts if texts is not None else domain_texts(domain):
            f.write(json.dumps({"text": t}) + "\n")
    return out
