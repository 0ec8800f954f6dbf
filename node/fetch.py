"""Fetching a published model version from a validator, verified file by file against its manifest.

Trust runs one way: the manifest's sha256 comes from the round (GetRound's model_sha256, which the
miner also signs into its submission), the manifest lists every file's sha256 and size, and each
file is refused unless its bytes hash to that (the format and its name rules: protocol.manifest).

Cache: one directory per (version, manifest sha256), safe for any number of processes at once
(CheckpointCache says how). Files land in a hidden partial directory and survive an interrupted
fetch (a restart downloads only what is missing or wrong); the directory is renamed into place when
every file verifies.
"""
from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

from expertmesh.node.locks import FileLock
from expertmesh.protocol import manifest as mf
from expertmesh.protocol.manifest import MANIFEST, Manifest, ManifestError
from expertmesh.protocol.types import CheckpointRef

Progress = Callable[[str, int, int], None]  # (what, bytes done, bytes total)


class CheckpointCache:
    """Verified local copies of published versions under `root` (the last `keep` are kept).

    Any number of processes may share one cache. Each version has a lock file in `.locks/`: a process
    holds it shared while it uses the version (from `ensure` until it ensures another version or calls
    `release`) and exclusive while it downloads or repairs it, so each file is fetched once and nothing
    another process writes or reads is touched. Downloads go to `.partial-<name>` (private to the
    exclusive holder; a killed one leaves files the next holder resumes from) and become visible by
    one rename. The cache-wide `.lock` is held shared while a version lock is taken and exclusive
    (never waited for) while pruning, which skips every version some process holds.
    """

    def __init__(self, root: Path, max_bytes: int = 64 << 30, keep: int = 2):
        self.root, self.max_bytes, self.keep = Path(root), max_bytes, keep
        self._held: FileLock | None = None  # the version this object last returned

    def _name(self, version: int, sha256: bytes) -> str:
        return f"v{version}-{sha256.hex()[:16]}"

    def _lock(self, name: str) -> FileLock:
        return FileLock(self.root / ".locks" / f"{name}.lock")

    def ensure(self, client, version: int, manifest_sha256: bytes, wanted: Callable[[str], bool] = lambda n: True,
               progress: Progress | None = None, stop: Callable[[], bool] = lambda: False) -> Path:
        """The directory of `version` with every wanted file verified; downloads what is missing.

        The version stays held by this object (never pruned by any process) until the next `ensure`
        of another version or `release`.
        """
        final = self.root / self._name(version, manifest_sha256)
        held = self._held
        lock = held if held is not None and held.path == self._lock(final.name).path else self._lock(final.name)
        try:
            with FileLock(self.root / ".lock") as cache_lock:  # keeps pruning out while the version lock is taken
                cache_lock.acquire(exclusive=False, stop=stop)
                lock.acquire(exclusive=False, stop=stop)
                if not self._complete(final, version, manifest_sha256, wanted):
                    lock.acquire(exclusive=True, stop=stop)  # waits while another process fills it
            if not self._complete(final, version, manifest_sha256, wanted):
                self._fill(client, final, version, manifest_sha256, wanted, progress, stop)
            lock.acquire(exclusive=False)  # a downgrade in place: nobody can take the version in between
        except BaseException:
            lock.release()
            if lock is held:
                self._held = None
            raise
        if held is not None and held is not lock:
            held.release()
        self._held = lock
        self._prune(final)
        return final

    def release(self) -> None:
        """Stop holding the version last returned (it may then be pruned)."""
        if self._held is not None:
            self._held.release()
            self._held = None

    def _complete(self, final: Path, version: int, sha256: bytes, wanted: Callable[[str], bool]) -> bool:
        """Whether `final` holds the expected manifest and every wanted file intact (reads only)."""
        if not final.is_dir():
            return False
        manifest = self._manifest(final, version, sha256, repair=False)
        return manifest is not None and not self._bad_files(final, manifest, wanted, repair=False)

    def _fill(self, client, final: Path, version: int, manifest_sha256: bytes, wanted: Callable[[str], bool],
              progress: Progress | None, stop: Callable[[], bool]) -> None:
        """Download what `final` lacks; only under the version's exclusive lock."""
        part = self.root / f".partial-{final.name}"
        if final.is_dir():
            shutil.rmtree(part, ignore_errors=True)
            final.rename(part)  # damaged locally, or lacks wanted files: repair it like an interrupted download
        part.mkdir(parents=True, exist_ok=True)
        for stray in part.rglob("upload-*.part"):  # a download killed mid-file leaves its spool file
            stray.unlink()
        manifest = self._manifest(part, version, manifest_sha256, repair=True)
        if manifest is None:
            client.fetch_manifest(part / MANIFEST, version=version, expected_sha256=manifest_sha256)
            manifest = self._manifest(part, version, manifest_sha256, repair=True)
        todo = self._bad_files(part, manifest, wanted, repair=True)
        total = sum(manifest.files[n][1] for n in todo)
        if total > self.max_bytes:
            raise ManifestError(f"version {version} needs {total} bytes, over this node's limit of {self.max_bytes}")
        done = 0
        for name in todo:
            if stop():
                raise InterruptedError("stopped during the checkpoint download")
            sha, size = manifest.files[name]
            if progress:
                progress(f"download v{version} {name}", done, total)
            client.fetch_checkpoint_file(CheckpointRef(version, name), part / name, expected_sha256=bytes.fromhex(sha))
            done += size
        if progress and todo:
            progress(f"download v{version}", total, total)
        part.rename(final)

    def _manifest(self, directory: Path, version: int, sha256: bytes, repair: bool) -> Manifest | None:
        """The manifest stored in `directory` if it is the expected one, else None (removed if `repair`)."""
        path = directory / MANIFEST
        if not path.is_file():
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).digest() != sha256:
            if repair:
                path.unlink()
            return None
        return mf.parse(data, sha256, version)

    def _bad_files(self, directory: Path, manifest: Manifest, wanted: Callable[[str], bool],
                   repair: bool) -> list[str]:
        """Wanted files that are missing or do not match the manifest (removed if `repair`)."""
        bad = mf.bad_files(directory, manifest, wanted)
        if repair:
            for name in bad:
                (directory / name).unlink(missing_ok=True)
        return bad

    def _prune(self, current: Path) -> None:
        """Keep the newest `keep` versions; drop partial downloads nobody is running. Versions that
        a process holds are skipped, and so is the whole pass while any process is taking a lock."""
        with FileLock(self.root / ".lock") as cache_lock:
            if not cache_lock.acquire(exclusive=True, wait=False):
                return
            partial = {d.name.removeprefix(".partial-") for d in self.root.glob(".partial-*") if d.is_dir()}
            done = sorted((d for d in self.root.glob("v*-*") if d.is_dir() and d != current),
                          key=lambda d: d.stat().st_mtime)
            drop = {d.name for d in done[: max(0, len(done) - (self.keep - 1))]} | (partial - {current.name})
            for name in sorted(drop):
                with self._lock(name) as lock:
                    if not lock.acquire(exclusive=True, wait=False):
                        continue  # held: in use or being downloaded
                    shutil.rmtree(self.root / f".partial-{name}", ignore_errors=True)
                    shutil.rmtree(self.root / name, ignore_errors=True)
                    lock.path.unlink(missing_ok=True)  # safe: no process can open it while we hold .lock


def tokenizer_files(name: str) -> bool:
    """Everything but the weights: enough for AutoTokenizer (and small)."""
    return not name.endswith(".safetensors")
