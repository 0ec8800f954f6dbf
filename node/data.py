"""Domain data: read records from the usual dataset files, render them to text, split by hash, pack tokens.

Every reader yields plain dict records; `render` turns a record into the text the model sees.
Errors are `DataError` (a ValueError) naming the file, the record and what to do.
"""
from __future__ import annotations

import csv
import gzip
import json
import string
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FORMATS = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet", ".txt", ".txt.gz", "a save_to_disk directory")


class DataError(ValueError):
    """A dataset file that cannot be used as given."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in (".jsonl.gz", ".txt.gz") if name.endswith(s)), path.suffix.lower())


# One record's text is at most 1 MiB by default (validators' datasets.max_record_bytes); JSON escaping can
# make its line up to six times that. No reader holds a longer line: a 50 MB one-line file is refused
# after reading this much of it, not loaded whole.
MAX_LINE = 6 * (1 << 20) + 64


def bounded_lines(f, path: Path | str, max_line: int = MAX_LINE) -> Iterator:
    """The lines of an open file (text or binary), none held past max_line characters or bytes."""
    n = 0
    while line := f.readline(max_line + 1):
        n += 1
        if len(line) > max_line:
            raise DataError(f"{path}: line {n} is over {max_line:,} characters; split long texts into "
                            "several records (one per line)")
        yield line


def _jsonl(lines: Iterable[str], path: Path) -> Iterator[dict]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {n} is not valid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {n} is a JSON {type(rec).__name__}, not an object with fields")
        yield rec


def _txt(lines: Iterable[str]) -> Iterator[dict]:
    """A plain text file: one record per blank-line-separated paragraph."""
    para: list[str] = []
    for line in lines:
        if line.strip():
            para.append(line.rstrip("\n"))
        elif para:
            yield {"text": "\n".join(para)}
            para = []
    if para:
        yield {"text": "\n".join(para)}


def _arrow_dir(path: Path) -> Iterator[dict]:
    """A directory written by `datasets.Dataset.save_to_disk` (Arrow IPC stream shards)."""
    import pyarrow as pa

    shards = sorted(path.glob("data-*.arrow")) or sorted(path.glob("*.arrow"))
    if not shards:
        raise DataError(f"{path}: a directory, but not one written by Dataset.save_to_disk (no .arrow files in it)")
    for shard in shards:
        with pa.memory_map(str(shard)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
            for batch in reader.read_all().to_batches():  # memory-mapped: batches are read lazily
                yield from batch.to_pylist()


def read_records(path: str | Path) -> Iterator[dict]:
    """Records of a dataset file, streamed where the format allows."""
    path = Path(path)
    if path.is_dir():
        yield from _arrow_dir(path)
        return
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file; give a dataset file ({', '.join(FORMATS)})")
    kind = _suffix(path)
    try:
        if kind == ".jsonl":
            with open(path, encoding="utf-8") as f:
                yield from _jsonl(bounded_lines(f, path), path)
        elif kind == ".jsonl.gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                yield from _jsonl(bounded_lines(f, path), path)
        elif kind == ".json":
            yield from _json(path)
        elif kind == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                yield from csv.DictReader(f)
        elif kind == ".parquet":
            import pyarrow.parquet as pq

            try:
                pf = pq.ParquetFile(path)
            except Exception as exc:  # pyarrow raises several types for a corrupt file
                raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
            for batch in pf.iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        elif kind == ".txt":
            with open(path, encoding="utf-8") as f:
                yield from _txt(bounded_lines(f, path))
        elif kind == ".txt.gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                yield from _txt(bounded_lines(f, path))
        else:
            raise DataError(f"{path}: unsupported format {kind or '(no extension)'!r}; use one of {', '.join(FORMATS)}")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: broken gzip stream ({exc})") from None


MAX_JSON_BYTES = 256 << 20  # a .json document is parsed whole; JSON Lines streams at any size


def _json(path: Path) -> Iterator[dict]:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise DataError(f"{path}: a {path.stat().st_size:,}-byte .json file is parsed whole, over the "
                        f"{MAX_JSON_BYTES:,}-byte limit; convert it to JSON Lines (.jsonl), which is streamed")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if isinstance(doc, dict) and doc and all(isinstance(v, list) for v in doc.values()):  # columnar
        n = len(next(iter(doc.values())))
        doc = [{k: v[i] for k, v in doc.items()} for i in range(n)]
    if not isinstance(doc, list):
        raise DataError(f"{path}: want a JSON list of objects (or {{'data': [...]}} or columns of equal length)")
    for n, rec in enumerate(doc, 1):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {n} is a JSON {type(rec).__name__}, not an object with fields")
        yield rec


def template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise DataError(f"bad --template {template!r}: {exc}") from None


def render(rec: dict, n: int, text_field: str | None = None, template: str | None = None) -> str:
    """The text of record n (1-based, for messages)."""
    if template is not None:
        missing = [k for k in template_fields(template) if k not in rec]
        if missing:
            raise DataError(f"record {n} lacks field(s) {missing} used by the template; fields present: {sorted(rec)}")
        return template.format_map({k: "" if v is None else v for k, v in rec.items()})
    field = text_field or "text"
    if field not in rec:
        hint = "--text-field NAME or --template" if text_field is None else "another --text-field or a --template"
        raise DataError(f"record {n} has no field {field!r} (fields: {sorted(rec)}); pass {hint}")
    value = rec[field]
    if not isinstance(value, str):
        raise DataError(f"record {n}: field {field!r} is a {type(value).__name__}, not text")
    return value


def iter_texts(path: str | Path, text_field: str | None = None, template: str | None = None) -> Iterator[str]:
    """Rendered, non-empty texts of a dataset file; DataError if it holds none."""
    if text_field is not None and template is not None:
        raise DataError("give either --text-field or --template, not both")
    seen = False
    for n, rec in enumerate(read_records(path), 1):
        text = render(rec, n, text_field, template)
        if text.strip():
            seen = True
            yield text
    if not seen:
        raise DataError(f"{path}: no non-empty records; a dataset needs at least one")




def pack(token_lists: Iterable[list[int]], seq_len: int, eos_id: int, max_tokens: int | None = None) -> torch.Tensor:
    """Concatenate documents (each followed by EOS) and cut into [N, seq_len] rows; the tail is dropped."""
    import torch  # here, so reading and checking data files (dataset submit) does not pay for importing torch

    buf: list[int] = []
    limit = None if max_tokens is None else max(seq_len, max_tokens - max_tokens % seq_len)
    for ids in token_lists:
        buf.extend(ids)
        buf.append(eos_id)
        if limit is not None and len(buf) >= limit:
            break
    n = len(buf) // seq_len if limit is None else min(len(buf), limit) // seq_len
    return torch.tensor(buf[: n * seq_len], dtype=torch.long).view(n, seq_len)


def tokenize(tokenizer, texts: Iterable[str], batch: int = 256) -> Iterator[list[int]]:
    """Token ids per text, tokenized in batches (fast tokenizers parallelise within a batch)."""
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == batch:
            yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]
            chunk = []
    if chunk:
        yield from tokenizer(chunk, add_special_tokens=False)["input_ids"]
