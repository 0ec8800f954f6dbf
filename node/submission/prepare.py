"""Checking a dataset file before it is registered, and writing the payload a validator takes.

Every record is rendered (text field or template) and checked: UTF-8, the field or the template's
keys present, valid Unicode, a bounded size; the first problem raises DataError naming the file,
the record (or line) and what to do, before anything is sent. The payload is what validators
register: gzip-compressed JSON Lines of {"text": ...}, one line per non-empty record.
"""
from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from expertmesh.node.data import DataError, bounded_lines, read_records, render

PREVIEW_RECORDS = 3


@dataclass(frozen=True)
class SubmitLimits:
    max_bytes: int = 4 << 30  # rendered payload (uncompressed JSON Lines); validators refuse more by default
    max_record_bytes: int = 1 << 20  # one record's text, as validators bound it by default
    # A validator holds out ~5% of the records for scoring and needs at least one 256-token row of them.
    min_tokens: int = 8192


@dataclass
class Prepared:
    payload: Path
    records: int = 0
    skipped_empty: int = 0
    text_bytes: int = 0
    source_bytes: int = 0
    preview: list[str] = field(default_factory=list)


def _kind(path: Path) -> str:
    name = path.name.lower()
    return "directory" if path.is_dir() else ".jsonl.gz" if name.endswith(".jsonl.gz") else path.suffix.lower()


def _check_utf8(path: Path) -> None:
    """Name the first line that is not UTF-8 (the readers would only give a byte offset)."""
    opener = gzip.open if _kind(path) == ".jsonl.gz" else open
    try:
        with opener(path, "rb") as f:
            for n, line in enumerate(bounded_lines(f, path), 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}: line {n} is not valid UTF-8 (byte {exc.start} of that line); "
                                    "re-encode the file as UTF-8") from None
    except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read it ({exc})") from None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def prepare(path: Path, out: Path, text_field: str | None = None, template: str | None = None,
            limits: SubmitLimits = SubmitLimits()) -> Prepared:
    """Check every record of `path` and write the registration payload to `out`."""
    path = Path(path)
    if text_field is not None and template is not None:
        raise DataError("give either --text-field or --template, not both")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_file() and _kind(path) in (".jsonl", ".jsonl.gz", ".csv", ".txt"):  # a .json may be one long line
        _check_utf8(path)
    result = Prepared(payload=out, source_bytes=_size(path))
    with gzip.GzipFile(out, "wb", mtime=0) as gz:  # mtime 0: the same data gives the same payload bytes
        for n, rec in enumerate(read_records(path), 1):
            try:
                text = render(rec, n, text_field, template)
            except DataError as exc:
                raise DataError(f"{path}: {exc}") from None
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:
                raise DataError(f"{path}: record {n} holds an unpaired surrogate (invalid Unicode); fix that record") from None
            if size > limits.max_record_bytes:
                raise DataError(f"{path}: record {n} is {size:,} bytes, over the {limits.max_record_bytes:,}-byte "
                                "limit per record; split it into several records")
            if not text.strip():
                result.skipped_empty += 1
                continue
            line = (json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8")
            result.text_bytes += len(line)
            if result.text_bytes > limits.max_bytes:
                raise DataError(f"{path}: over the {limits.max_bytes:,}-byte size limit at record {n}; "
                                "split the dataset into several submissions")
            gz.write(line)
            result.records += 1
            if len(result.preview) < PREVIEW_RECORDS:
                result.preview.append(text)
    if result.records == 0:
        raise DataError(f"{path}: no non-empty records; a dataset needs at least one")
    return result


def payload_texts(payload: Path) -> Iterator[str]:
    with gzip.open(payload, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def count_tokens(encode, texts: Iterator[str], batch: int = 256) -> int:
    """Tokens of all texts; `encode` maps a list of texts to their token ids."""
    total, chunk = 0, []
    for text in texts:
        chunk.append(text)
        if len(chunk) == batch:
            total += sum(map(len, encode(chunk)))
            chunk = []
    if chunk:
        total += sum(map(len, encode(chunk)))
    return total
