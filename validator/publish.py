"""Publishing a version: a stock HF checkpoint plus manifest.json, made visible atomically.

The checkpoint is written into a hidden temporary directory beside its final place, every file and
the directory are fsynced, and only then is it renamed to `v<version>`; a crash at any point leaves
either no `v<version>` or a complete one. Weights are saved in fp32 so small merged deltas are not
rounded away. The manifest lists every file's sha256 and holds no wall-clock time, so the same
inputs give a byte-identical directory.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from expertmesh.protocol import manifest as mf
from expertmesh.protocol.files import fsync_path
from expertmesh.protocol.manifest import MANIFEST, ManifestError


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
    mf.write(tmp, version, manifest)
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


def manifest_sha256(directory: Path) -> str:
    return mf.read(directory).sha256.hex()


def manifest_file(directory: Path, name: str) -> Path:
    """The path of a file the manifest lists; anything else (../, absolute, unlisted) is refused."""
    if name == MANIFEST:
        return directory / MANIFEST
    if name not in mf.read(directory).files:
        raise ManifestError(f"{name!r} is not a file of this checkpoint; see its manifest for the names")
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
