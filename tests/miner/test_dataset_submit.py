"""`expertmesh dataset submit` through the real CLI: every accepted format registers, every bad file is refused.

The server is a real gRPC server on 127.0.0.1:0 around the real validator (validatorparts.py); token counts use the tokenizer
fetched from it (verified against its manifest). Bad files must fail with one `error:` line naming
the problem, exit code 2, and nothing sent.
"""
from __future__ import annotations

import csv
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

TEMPLATE = "{question}\n{answer}"


@pytest.fixture(scope="module")
def records(gsm8k):
    return gsm8k[:120]


def _write(kind: str, dest, records):
    """A dataset file of `kind` holding `records`, and the CLI flags that render it."""
    texts = [{"text": f"{r['question']}\n{r['answer']}"} for r in records]
    if kind == "jsonl":
        path = dest / "math.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path, ["--template", TEMPLATE]
    if kind == "jsonl.gz":
        path = dest / "math.jsonl.gz"
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode()))
        return path, ["--template", TEMPLATE]
    if kind == "json":
        path = dest / "math.json"
        path.write_text(json.dumps(texts))
        return path, []
    if kind == "csv":
        path = dest / "math.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["question", "answer"])
            w.writeheader()
            w.writerows(records)
        return path, ["--template", TEMPLATE]
    if kind == "parquet":
        path = dest / "math.parquet"
        pq.write_table(pa.Table.from_pylist([{"body": t["text"]} for t in texts]), path)
        return path, ["--text-field", "body"]
    if kind == "txt":
        path = dest / "math.txt"
        path.write_text("\n\n".join(t["text"] for t in texts) + "\n")
        return path, []
    if kind == "save_to_disk":  # the layout datasets.Dataset.save_to_disk writes: Arrow IPC stream shards
        path = dest / "math_dataset"
        path.mkdir()
        table = pa.Table.from_pylist(texts)
        with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
        return path, []
    raise AssertionError(kind)


FORMATS = ["jsonl", "jsonl.gz", "json", "csv", "parquet", "txt", "save_to_disk"]


def test_every_format_registers_through_the_cli(validator, key_file, records, tmp_path, cli):
    ids = set()
    for kind in FORMATS:
        path, flags = _write(kind, tmp_path, records)
        r = cli("dataset", "submit", str(path), "--domain", "math", "--validator", validator.address,
                    "--key", str(key_file), "--cache-dir", str(tmp_path / "cache"), *flags, timeout=120)
        assert r.returncode == 0, (kind, r.stderr)
        assert "records: 120" in r.stdout and "preview:" in r.stdout, (kind, r.stdout)
        tokens = int(next(l for l in r.stdout.splitlines() if l.startswith("tokens:")).split()[1].replace(",", ""))
        assert tokens > 8192, (kind, tokens)
        dataset_id = next(l for l in r.stdout.splitlines() if l.startswith("registered:")).split()[2]
        ids.add(dataset_id)
    # Same records, same rendering: every format is the same dataset to the validator.
    assert len(ids) == 1 and validator.dataset_uploads == len(FORMATS)
    row = validator.node.ledger.dataset(ids.pop())
    n_train = row.train_records
    assert row.records == 120 and row.train_records + row.heldout_records == 120 and n_train > 0
    # The tokenizer was fetched once, verified, and cached: only non-weight files.
    cached = list((tmp_path / "cache" / "tokenizers").glob("v0-*"))
    assert len(cached) == 1 and not list(cached[0].glob("*.safetensors")) and (cached[0] / "tokenizer.json").is_file()

    r = cli("dataset", "list", "--validator", validator.address, "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    row = next(l for l in r.stdout.splitlines() if l.startswith("math "))
    assert f"{n_train:,}" in row.split()[-2]


def _bad_files(dest, records):
    """(name, path, flags, what the error line must say) for each kind of bad file."""
    out = []
    p = dest / "latin1.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "fine too"}\n{"text": "caf\xe9"}\n')
    out.append(("not utf-8", p, [], "line 3 is not valid UTF-8"))
    p = dest / "empty.jsonl"
    p.write_text("\n\n")
    out.append(("empty", p, [], "no non-empty records"))
    p = dest / "nofield.jsonl"
    p.write_text("".join(json.dumps({"text": "x " * 50}) + "\n" for _ in range(4)) + json.dumps({"body": "y"}) + "\n")
    out.append(("missing field", p, [], "record 5 has no field 'text'"))
    p = dest / "template.jsonl"
    rows = [dict(r) for r in records[:10]]
    del rows[6]["answer"]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out.append(("template key", p, ["--template", TEMPLATE], "record 7 lacks field(s) ['answer']"))
    p = dest / "number.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": 42}) + "\n")
    out.append(("not text", p, [], "record 2: field 'text' is a int"))
    p = dest / "broken.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    out.append(("bad json", p, [], "line 2 is not valid JSON"))
    p = dest / "tiny.jsonl"
    p.write_text("".join(json.dumps({"text": f"{r['question']}"}) + "\n" for r in records[:3]))
    out.append(("too few tokens", p, [], "fewer than the minimum of 8,192"))
    p = dest / "big.jsonl"
    p.write_text("".join(json.dumps({"text": r["question"]}) + "\n" for r in records))
    out.append(("size limit", p, ["--max-bytes", "2000"], "size limit"))
    p = dest / "longrecord.jsonl"
    p.write_text(json.dumps({"text": "a" * 5000}) + "\n")
    out.append(("record too large", p, ["--max-record-bytes", "4096"], "record 1 is 5,000 bytes"))
    p = dest / "data.xml"
    p.write_text("<data/>")
    out.append(("unsupported format", p, [], "unsupported format '.xml'"))
    return out


def test_bad_files_are_refused_with_one_line_and_nothing_sent(validator, key_file, records, tmp_path, cli):
    for name, path, flags, want in _bad_files(tmp_path, records):
        r = cli("dataset", "submit", str(path), "--domain", "math", "--validator", validator.address,
                    "--key", str(key_file), "--cache-dir", str(tmp_path / "cache"), *flags, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], (name, lines)
        assert "Traceback" not in r.stdout + r.stderr
    assert validator.dataset_uploads == 0 and not validator.node.ledger.datasets()
