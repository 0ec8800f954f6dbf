"""Publishing a version: a stock HF checkpoint plus manifest.json, made visible atomically.

The checkpoint is written into a hidden temporary directory beside its final place, every file and
the directory are fsynced, and only then is it renamed to `v<version>`; a crash at any point leaves
either no `v<version>` or a complete one. Weights are saved in fp32 so small merged deltas are not
rounded away. The manifest lists every file's sha256 and holds no wall-clock time, so the same
inputs give a byte-identical directory.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from expertmesh.node.files import file_sha256, fsync_path

MANIFEST = "manifest.json"
FORMAT = "expertmesh-manifest/1"


class CheckpointError(ValueError):
    """A published directory whose files do not match its manifest."""


def version_dir(root: Path, version: int) -> Path:
    return root / f"v{version}"


def write_checkpoint(model: torch.nn.Module, tokenizer, root: Path, version: int, manifest: dict,
                     before_rename: Callable[[], None] | None = None) -> Path:
    """Save `model` (fp32) and `tokenizer` as root/v<version> with a manifest; returns that directory.

    A leftover temporary directory from a crashed attempt is discarded; an existing final directory
    is the caller's business (it is replaced, so call this only for a version the ledger lacks).
    """
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = version_dir(root, version), root / f".tmp-v{version}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.dtype = torch.float32  # stock from_pretrained(dtype="auto") must not round the merge away
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[f.relative_to(tmp).as_posix()] = {"sha256": file_sha256(f), "size": f.stat().st_size}
    doc = {"format": FORMAT, "version": version, **manifest, "files": files}
    (tmp / MANIFEST).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    for f in tmp.rglob("*"):
        fsync_path(f)
    fsync_path(tmp)
    if before_rename is not None:
        before_rename()
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    return final


def read_manifest(directory: Path) -> dict:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory}: no readable {MANIFEST} ({exc})") from None


def manifest_sha256(directory: Path) -> str:
    return file_sha256(directory / MANIFEST)


def verify_checkpoint(directory: Path) -> dict:
    """The manifest, once every file it lists has its size and sha256 and nothing else is there."""
    doc = read_manifest(directory)
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {MANIFEST}
    if present != set(doc.get("files", {})):
        raise CheckpointError(f"{directory}: files {sorted(present ^ set(doc.get('files', {})))} differ from the manifest")
    for name, meta in doc["files"].items():
        path = directory / name
        if path.stat().st_size != meta["size"] or file_sha256(path) != meta["sha256"]:
            raise CheckpointError(f"{directory}: {name} does not match its manifest sha256")
    return doc


def manifest_file(directory: Path, name: str) -> Path:
    """The path of a file the manifest lists; anything else (../, absolute, unlisted) is refused."""
    if name == MANIFEST:
        return directory / MANIFEST
    if name not in read_manifest(directory).get("files", {}):
        raise CheckpointError(f"{name!r} is not a file of this checkpoint; see its manifest for the names")
    return directory / name


def prune(root: Path, keep: set[int]) -> list[int]:
    """Delete published version directories not in `keep` (and stray temporaries); the versions removed."""
    removed = []
    for d in sorted(root.glob("v*")):
        if d.name[1:].isdigit() and int(d.name[1:]) not in keep:
            shutil.rmtree(d)
            removed.append(int(d.name[1:]))
    for d in root.glob(".tmp-v*"):
        shutil.rmtree(d, ignore_errors=True)
    return removed
