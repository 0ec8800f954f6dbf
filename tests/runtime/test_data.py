import gzip
import json

import pytest

from expertmesh.node.data import DataError, iter_texts, pack, split


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
    train, held = split(texts + texts[:10])
    assert len(train) + len(held) == 2000
    assert 50 <= len(held) <= 150  # about 5%
    train2, held2 = split(list(reversed(texts)))
    assert set(held2) == set(held)  # order does not matter, content does


def test_pack_rows():
    rows = pack([[1, 2, 3], [4, 5]], seq_len=3, eos_id=0)
    assert rows.tolist() == [[1, 2, 3], [0, 4, 5]]
    assert pack([[1] * 10], seq_len=4, eos_id=0, max_tokens=8).shape == (2, 4)
