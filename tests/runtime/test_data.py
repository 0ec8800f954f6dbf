import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from expertmesh.node.data import DataError, iter_texts, pack
from expertmesh.protocol.heldout import split


RECORDS = [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": "4"}]


def write_all(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "d.json").write_text(json.dumps(RECORDS))
    (tmp_path / "d.csv").write_text("question,answer\n1+1?,2\n2+2?,4\n")
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "d.parquet")
    arrow_dir = tmp_path / "saved"
    arrow_dir.mkdir()
    table = pa.Table.from_pylist(RECORDS)
    with pa.ipc.new_stream(str(arrow_dir / "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table)
    return ["d.jsonl", "d.jsonl.gz", "d.json", "d.csv", "d.parquet", "saved"]


def test_every_format_renders_the_same_texts(tmp_path):
    for name in write_all(tmp_path):
        assert list(iter_texts(tmp_path / name, template="{question} {answer}")) == ["1+1? 2", "2+2? 4"], name
        assert list(iter_texts(tmp_path / name, text_field="answer")) == ["2", "4"], name


def test_txt_records_are_paragraphs(tmp_path):
    (tmp_path / "t.txt").write_text("A:\nhello\n\n\nB:\nworld\n")
    assert list(iter_texts(tmp_path / "t.txt")) == ["A:\nhello", "B:\nworld"]


@pytest.mark.parametrize("content,kwargs,match", [
    ("", {}, "no non-empty records"),
    ('{"a": "x"}\nnot json\n', {"text_field": "a"}, "line 2 is not valid JSON"),
    ('{"q": "x"}\n{"z": "y"}\n', {"template": "{q}"}, r"record 2 lacks field\(s\) \['q'\]"),
    ('{"q": "x"}\n', {"text_field": "text"}, "no field 'text'"),
    ('[1, 2]\n', {}, "is a JSON list"),
])
def test_bad_jsonl_says_which_record(tmp_path, content, kwargs, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=match):
        list(iter_texts(tmp_path / "bad.jsonl", **kwargs))


def test_unreadable_and_unsupported_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="unsupported format"):
        list(iter_texts(tmp_path / "x.bin"))
    with pytest.raises(DataError, match="not UTF-8"):
        list(iter_texts(tmp_path / "latin.txt"))
    with pytest.raises(DataError, match="no such file"):
        list(iter_texts(tmp_path / "missing.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        list(iter_texts(tmp_path / "empty"))


def test_split_is_by_content_and_dedupes():
    texts = [f"record {i}" for i in range(2000)]
    train, held = split(texts + texts[:10], 0.05)
    assert len(train) + len(held) == 2000
    assert 50 <= len(held) <= 150  # about 5%
    train2, held2 = split(list(reversed(texts)), 0.05)
    assert set(held2) == set(held)  # order does not matter, content does


def test_pack_rows():
    rows = pack([[1, 2, 3], [4, 5]], seq_len=3, eos_id=0)
    assert rows.tolist() == [[1, 2, 3], [0, 4, 5]]
    assert pack([[1] * 10], seq_len=4, eos_id=0, max_tokens=8).shape == (2, 4)


def test_txt_gz_reads_like_txt(tmp_path):
    text = "first paragraph\nstill first\n\nsecond\n\n\nthird\n"
    (tmp_path / "d.txt").write_text(text)
    with gzip.open(tmp_path / "d.txt.gz", "wt") as f:
        f.write(text)
    assert list(iter_texts(tmp_path / "d.txt")) == list(iter_texts(tmp_path / "d.txt.gz")) == \
        ["first paragraph\nstill first", "second", "third"]


SHARED = Path(__file__).resolve().parents[3] / "shared"
LOAD_DEMO_DATA = f"""
import sys
shared = {str(SHARED)!r}
def refuse(event, args):  # ../shared is unreachable for this process: any open of it fails
    if event == "open" and isinstance(args[0], str) and args[0].startswith(shared):
        raise PermissionError("opened " + args[0])
sys.addaudithook(refuse)
from pathlib import Path
from expertmesh.node.demo.heldout import domain_sources
from expertmesh.node.paths import SHIPPED_DATA
sources = domain_sources(Path(sys.argv[1]))
for name, src in sources.items():
    print(name, len(src.texts()), src.path.is_relative_to(SHIPPED_DATA) or src.path.is_relative_to(sys.argv[1]))
"""


def test_the_demo_data_ships_in_the_package_and_needs_no_shared_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EXPERTMESH_DATA"}
    r = subprocess.run([sys.executable, "-c", LOAD_DEMO_DATA, str(tmp_path)], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    counts = {name: (int(n), ok == "True") for name, n, ok in (l.split() for l in r.stdout.splitlines())}
    assert counts["math"] == (7473, True)  # GSM8K train has 7,473 problems
    assert counts["literature"][0] > 7000 and counts["literature"][1]
    assert counts["code"][0] > 1000 and counts["code"][1]


def test_expertmesh_data_points_elsewhere_and_a_bad_one_is_one_clear_error(tmp_path, monkeypatch):
    from expertmesh.node.paths import corpus

    (tmp_path / "gsm8k_train.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    monkeypatch.setenv("EXPERTMESH_DATA", str(tmp_path))
    assert corpus("gsm8k_train.jsonl") == tmp_path / "gsm8k_train.jsonl"
    with pytest.raises(FileNotFoundError, match="tinyshakespeare.txt.gz nor tinyshakespeare.txt"):
        corpus("tinyshakespeare.txt")
    monkeypatch.setenv("EXPERTMESH_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        corpus("gsm8k_train.jsonl")
