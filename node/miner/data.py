"""The miner's domain data: a local dataset file, or the domain's registered train split(s) from the validator.

Either way the miner trains only on records outside the hash-chosen held-out split (protocol.heldout),
at the fraction the validator states in its round, so it never trains on what that validator scores
with, even when it holds a copy of a registered file.
The data is identified by a digest (file bytes and rendering, or the registered datasets' sha256s);
profiles, selections and token rows are cached per digest.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from expertmesh.node.data import DataError, iter_texts
from expertmesh.protocol.files import file_sha256
from expertmesh.protocol.heldout import content_hash, is_heldout
from expertmesh.node.jobs import file_digest
from expertmesh.node.miner.config import DataSection
from expertmesh.node.miner.locate import CannotTakePart


@dataclass(frozen=True)
class DomainData:
    files: tuple[Path, ...]
    text_field: str | None
    template: str | None
    digest: str  # hex sha256 naming this exact data, its rendering and its held-out fraction
    source: str  # for messages
    heldout_fraction: float  # the validator's

    def train_texts(self) -> Iterator[str]:
        """Rendered texts outside the held-out split, deduplicated, in file order."""
        seen: set[str] = set()
        for path in self.files:
            for text in iter_texts(path, self.text_field, self.template):
                h = content_hash(text)
                if h in seen or is_heldout(text, self.heldout_fraction):
                    continue
                seen.add(h)
                yield text


def check_local(cfg: DataSection) -> None:
    """Fail fast (a fatal config error) on a local file that cannot be read or rendered."""
    if cfg.path is not None:
        next(iter_texts(cfg.path, cfg.text_field, cfg.template))


class DataSource:
    def __init__(self, cfg: DataSection, domain: str, cache_dir: Path, max_bytes: int):
        self.cfg, self.domain, self.cache_dir, self.max_bytes = cfg, domain, Path(cache_dir), max_bytes

    def load(self, client, heldout_fraction: float) -> DomainData:
        """The domain's data, split at the validator's held-out fraction (its RoundInfo's)."""
        if self.cfg.path is not None:
            return self._local(self.cfg.path, heldout_fraction)
        return self._registered(client, heldout_fraction)

    def _local(self, path: Path, fraction: float) -> DomainData:
        render = f"{self.cfg.text_field}|{self.cfg.template}|{fraction!r}"
        digest = hashlib.sha256(f"{file_digest(path)}|{render}".encode()).hexdigest()
        return DomainData((path,), self.cfg.text_field, self.cfg.template, digest, str(path), fraction)

    def _registered(self, client, fraction: float) -> DomainData:
        infos = sorted(client.list_datasets(self.domain), key=lambda i: (i.registered_ms, i.dataset_id))
        infos = [i for i in infos if i.domain == self.domain]
        if not infos:
            raise CannotTakePart("no_data", f"no dataset is registered for domain {self.domain!r} at the validator; "
                                 "register one with `expertmesh dataset submit` or set data.path")
        files = []
        for info in infos:
            if info.size > self.max_bytes:
                raise CannotTakePart("data", f"dataset {info.dataset_id} is {info.size} bytes, over "
                                     f"validator.max_dataset_bytes={self.max_bytes}")
            path = self.cache_dir / f"{info.sha256.hex()}.jsonl"
            if not path.is_file() or file_sha256(path) != info.sha256.hex():
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                client.fetch_dataset(info.dataset_id, path, expected_sha256=info.sha256)
            files.append(path)
        digest = hashlib.sha256(b"".join(i.sha256 for i in infos) + repr(fraction).encode()).hexdigest()
        data = DomainData(tuple(files), "text", None, digest, f"{len(infos)} registered dataset(s) of {self.domain}",
                          fraction)
        try:
            next(data.train_texts())
        except (DataError, StopIteration) as exc:  # served bytes are untrusted: refuse, do not crash
            raise CannotTakePart("data", f"the validator's train split of {self.domain!r} is unusable: "
                                 f"{exc or 'no records outside the held-out split'}") from None
        return data
