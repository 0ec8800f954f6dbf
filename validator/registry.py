"""Registered datasets: deduplicated by content hash, split train/held-out by hash, both stored.

The payload of a registration is UTF-8 JSON Lines, one {"text": "..."} object per record, optionally
gzip-compressed (docs/validator.md). It is parsed as a stream with bounded records. The held-out
part (protocol.heldout, keyed by this validator's secret: nobody else can tell which records it
is) stays here for scoring; only the train part is ever served. A dataset's id is derived from its domain and content, so registering the same
data twice gives the same id and stores it once.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from expertmesh.node.data import DataError, bounded_lines, iter_texts
from expertmesh.validator.ledger import DatasetRow, Ledger
from expertmesh.protocol.files import file_sha256
from expertmesh.protocol.heldout import DEFAULT_FRACTION, content_hash, is_heldout


class DatasetError(ValueError):
    """A dataset payload that cannot be registered; the message names the record and the fix."""


@dataclass(frozen=True)
class RegistryLimits:
    heldout_fraction: float = DEFAULT_FRACTION
    max_records: int = 2_000_000
    max_record_bytes: int = 1 << 20
    max_bytes: int = 4 << 30  # decompressed payload, counted while it is read
    max_expansion: float = 64.0  # decompressed bytes per byte uploaded (text gzips 3-5x; a bomb 1000x)


def _lines(path: Path, max_line: int, max_bytes: int) -> Iterator[bytes]:
    """Lines of a plain or gzip file, never one past max_line held whole nor more than max_bytes in all."""
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    total = 0
    try:
        with opener(path, "rb") as f:
            for line in bounded_lines(f, "dataset payload", max_line):
                total += len(line)
                if total > max_bytes:
                    raise DatasetError(f"dataset payload decompresses to over {max_bytes:,} bytes, this validator's "
                                       "limit (datasets.max_bytes, datasets.max_expansion); split it into several "
                                       "datasets")
                yield line
    except DataError as exc:
        raise DatasetError(str(exc)) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DatasetError(f"dataset payload is a broken gzip stream ({exc}); send plain or valid gzip JSON Lines") from None


def read_payload(path: Path, limits: RegistryLimits) -> Iterator[str]:
    """The texts of a registration payload, checked record by record while it streams."""
    n = 0
    max_bytes = min(limits.max_bytes, int(limits.max_expansion * path.stat().st_size) + (1 << 20))
    # JSON escaping can double a text's bytes (or sextuple, for \uXXXX); bound the raw line generously.
    for n_line, line in enumerate(_lines(path, 6 * limits.max_record_bytes + 64, max_bytes), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DatasetError(f"line {n_line} is not a UTF-8 JSON object; each line must be {{\"text\": \"...\"}}") from None
        text = rec.get("text") if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise DatasetError(f'line {n_line} has no string field "text"; each line must be {{"text": "..."}}')
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise DatasetError(f"line {n_line}: text holds an unpaired surrogate escape; send valid Unicode") from None
        if size > limits.max_record_bytes:
            raise DatasetError(f"record on line {n_line} is over {limits.max_record_bytes} bytes; split long texts")
        if not text.strip():
            continue
        n += 1
        if n > limits.max_records:
            raise DatasetError(f"more than {limits.max_records} records; split the dataset")
        yield text


class Registry:
    """Datasets on disk (root/<dataset_id>/{train,heldout}.jsonl) and in the ledger."""

    def __init__(self, root: Path, ledger: Ledger, limits: RegistryLimits = RegistryLimits(),
                 heldout_key: bytes | None = None):
        self.root, self.ledger, self.limits, self.heldout_key = root, ledger, limits, heldout_key
        self._publish_lock = threading.Lock()  # two uploads of the same content must not swap directories
        root.mkdir(parents=True, exist_ok=True)

    def register(self, payload: Path, domain: str, name: str, owner: str, now_ms: int | None = None) -> DatasetRow:
        tmp = self.root / f".tmp-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir()
        try:
            return self._register(payload, domain, name, owner, tmp, now_ms or int(time.time() * 1000))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _register(self, payload: Path, domain: str, name: str, owner: str, tmp: Path, now_ms: int) -> DatasetRow:
        seen: set[str] = set()
        ident = hashlib.sha256(f"expertmesh/v1/dataset|{domain}|".encode())
        counts = {"records": 0, "train": 0, "heldout": 0}
        with open(tmp / "train.jsonl", "w", encoding="utf-8") as train, \
                open(tmp / "heldout.jsonl", "w", encoding="utf-8") as held:
            for text in read_payload(payload, self.limits):
                counts["records"] += 1
                h = content_hash(text)
                if h in seen:
                    continue
                seen.add(h)
                ident.update(bytes.fromhex(h))
                part = "heldout" if is_heldout(text, self.limits.heldout_fraction, self.heldout_key) else "train"
                counts[part] += 1
                (held if part == "heldout" else train).write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            for f in (train, held):
                f.flush()
                os.fsync(f.fileno())
        if not seen:
            raise DatasetError("the dataset has no non-empty records")
        counts["duplicates"] = counts["records"] - len(seen)
        dataset_id = f"{domain}-{ident.hexdigest()[:16]}"
        with self._publish_lock:
            known = self.ledger.dataset(dataset_id)
            return known or self._publish(tmp, dataset_id, domain, name, owner, counts, now_ms)

    def _publish(self, tmp: Path, dataset_id: str, domain: str, name: str, owner: str, counts: dict,
                 now_ms: int) -> DatasetRow:
        final = self.root / dataset_id
        shutil.rmtree(final, ignore_errors=True)  # a leftover of a crash before its ledger row
        os.rename(tmp, final)
        train_path = final / "train.jsonl"
        row = DatasetRow(dataset_id=dataset_id, domain=domain, name=name, owner=owner, records=counts["records"],
                         duplicates=counts["duplicates"], train_records=counts["train"],
                         heldout_records=counts["heldout"], train_path=str(train_path.relative_to(self.root)),
                         heldout_path=str((final / "heldout.jsonl").relative_to(self.root)),
                         train_sha256=file_sha256(train_path), train_bytes=train_path.stat().st_size,
                         registered_ms=now_ms)
        self.ledger.add_dataset(row)
        return row

    def register_file(self, path: Path, domain: str, name: str, owner: str, text_field: str | None = None,
                      template: str | None = None) -> DatasetRow:
        """A local dataset file in any format node.data reads, rendered and registered like an upload."""
        payload = self.root / f".preload-{os.getpid()}.jsonl"
        try:
            write_payload(iter_texts(path, text_field, template), payload)
            return self.register(payload, domain, name or Path(path).name, owner)
        finally:
            payload.unlink(missing_ok=True)

    def train_path(self, dataset_id: str) -> Path:
        row = self.ledger.dataset(dataset_id)
        if row is None:
            raise DatasetError(f"no dataset {dataset_id!r} here; list them with `expertmesh dataset list`")
        return self.root / row.train_path

    def heldout_texts(self, dataset_ids: Iterable[str]) -> Iterator[str]:
        return self._texts(dataset_ids, "heldout_path")

    def train_texts(self, dataset_ids: Iterable[str]) -> Iterator[str]:
        return self._texts(dataset_ids, "train_path")

    def _texts(self, dataset_ids: Iterable[str], part: str) -> Iterator[str]:
        for dataset_id in dataset_ids:
            row = self.ledger.dataset(dataset_id)
            with open(self.root / getattr(row, part), encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)["text"]


def write_payload(texts: Iterable[str], out: Path) -> Path:
    """A registration payload (JSON Lines of {"text": ...}) from texts; what `dataset submit` sends."""
    with open(out, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return out
