"""The manifest of a published model version: one writer, one reader, one verifier, one error.

A version is a directory of checkpoint files plus `manifest.json`, which lists every file's sha256
and size next to the validator's own fields (parent, round, accepted submissions, leaderboard). A
version is named by (number, sha256 of its manifest); miners get that sha256 from the round, so
the manifest is what every downloaded file is checked against. File names come from the network
too: only plain relative names of known, non-executable kinds are valid (weights in safetensors
only; a pickle or .bin file makes the manifest invalid, it is never loaded). The writer refuses
what the reader would, so a validator cannot publish a version its miners must refuse.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from expertmesh.protocol.files import file_sha256

MANIFEST = "manifest.json"
FORMAT = "expertmesh-manifest/1"
# What a checkpoint may hold: weights (safetensors), configs, tokenizer files. Nothing executable.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".md", ".model", ".jinja", ".tiktoken")
_PART = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
_NAME = re.compile(rf"^{_PART}(/{_PART}){{0,3}}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A manifest, or a file it lists, that does not verify; the message names the problem."""


@dataclass(frozen=True)
class Manifest:
    version: int
    sha256: bytes  # of the manifest file itself
    files: dict[str, tuple[str, int]]  # name -> (sha256 hex, size)
    doc: dict  # the whole document, the validator's fields included


def parse(data: bytes, sha256: bytes, version: int | None = None) -> Manifest:
    """Check a manifest's structure and names; ManifestError naming the first problem."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest is not JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict) or not isinstance(doc.get("version"), int):
        raise ManifestError('manifest lacks an integer "version" or a "files" object')
    if version is not None and doc["version"] != version:
        raise ManifestError(f"manifest is for version {doc['version']}, not the requested {version}")
    files: dict[str, tuple[str, int]] = {}
    for name, meta in doc["files"].items():
        _check_name(name)
        sha, size = (meta.get("sha256"), meta.get("size")) if isinstance(meta, dict) else (None, None)
        if not isinstance(sha, str) or not _HEX64.match(sha) or not isinstance(size, int) or size < 0:
            raise ManifestError(f"manifest entry {name!r} lacks a sha256 (64 hex) or a size")
        files[name] = (sha, size)
    if not any(n.endswith(".safetensors") for n in files) or "config.json" not in files:
        raise ManifestError("manifest lists no config.json or no safetensors weights")
    return Manifest(doc["version"], sha256, files, doc)


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name) or name == MANIFEST or not name.endswith(ALLOWED_SUFFIXES):
        raise ManifestError(f"manifest lists {name[:80]!r}: not a plain relative name of an allowed kind "
                            f"({', '.join(ALLOWED_SUFFIXES)})")


def write(directory: Path, version: int, fields: dict) -> bytes:
    """List every file in `directory` into its manifest.json (beside `fields`); returns the bytes written.

    Deterministic: sorted keys and no clock, so the same files and fields give the same sha256.
    """
    listed = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        name = f.relative_to(directory).as_posix()
        _check_name(name)
        listed[name] = {"sha256": file_sha256(f), "size": f.stat().st_size}
    data = (json.dumps({"format": FORMAT, "version": version, **fields, "files": listed}, indent=1, sort_keys=True)
            + "\n").encode()
    parse(data, b"", version)  # what the miners' reader would refuse is never written
    (directory / MANIFEST).write_bytes(data)
    return data


def read(directory: Path, version: int | None = None) -> Manifest:
    """The manifest stored in `directory` (structure checked, files not)."""
    try:
        data = (Path(directory) / MANIFEST).read_bytes()
    except OSError as exc:
        raise ManifestError(f"{directory}: no readable {MANIFEST} ({exc.strerror})") from None
    return parse(data, hashlib.sha256(data).digest(), version)


def bad_files(directory: Path, manifest: Manifest, wanted: Callable[[str], bool] = lambda name: True) -> list[str]:
    """The wanted files the manifest lists that are missing in `directory` or differ in size or sha256."""
    bad = []
    for name, (sha, size) in sorted(manifest.files.items()):
        path = Path(directory) / name
        if wanted(name) and not (path.is_file() and path.stat().st_size == size and file_sha256(path) == sha):
            bad.append(name)
    return bad


def verify(directory: Path) -> Manifest:
    """The manifest, once every file it lists is there intact and nothing else is."""
    manifest = read(directory)
    present = {p.relative_to(directory).as_posix() for p in Path(directory).rglob("*") if p.is_file()} - {MANIFEST}
    if present != set(manifest.files):
        raise ManifestError(f"{directory}: files {sorted(present ^ set(manifest.files))} differ from the manifest")
    bad = bad_files(directory, manifest)
    if bad:
        raise ManifestError(f"{directory}: {bad[0]} does not match its manifest sha256")
    return manifest
