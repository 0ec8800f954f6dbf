"""Publishing, the dataset registry and the spool: files on disk, atomic and verified."""
import gzip
import json

import pytest
import torch

from expertmesh.protocol.heldout import is_heldout
from expertmesh.node.moe import load_model
from expertmesh.node.paths import DEFAULT_MODEL
from expertmesh.validator.ledger import Ledger
from expertmesh.protocol.manifest import ManifestError, verify
from expertmesh.validator.publish import manifest_file, manifest_sha256, prune, version_dir, write_checkpoint
from expertmesh.validator.registry import DatasetError, Registry, RegistryLimits, write_payload
from expertmesh.validator.spool import Spool


@pytest.fixture(scope="module")
def shipped():
    return load_model(DEFAULT_MODEL)


def test_checkpoint_is_stock_loadable_fp32_and_verified(shipped, tmp_path):
    moe, tok = shipped
    d = write_checkpoint(moe.model, tok, tmp_path, 3, {"parent": 2, "accepted": []})
    doc = verify(d).doc
    assert d == version_dir(tmp_path, 3) and doc["version"] == 3 and doc["parent"] == 2
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(doc["files"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stock = AutoModelForCausalLM.from_pretrained(d)  # dtype left to the checkpoint: it must say fp32
    assert next(stock.parameters()).dtype == torch.float32
    assert torch.equal(stock.model.layers[1].mlp.experts.down_proj, moe.model.model.layers[1].mlp.experts.down_proj)
    assert AutoTokenizer.from_pretrained(d)("x + 1 = 2")["input_ids"] == tok("x + 1 = 2")["input_ids"]

    (d / "config.json").write_text((d / "config.json").read_text().replace("qwen3", "qwen3 "))
    with pytest.raises(ManifestError, match="config.json"):
        verify(d)
    (d / "extra.bin").write_bytes(b"x")
    with pytest.raises(ManifestError, match="extra.bin"):
        verify(d)


def test_a_crash_before_the_rename_leaves_no_version_visible(shipped, tmp_path):
    moe, tok = shipped

    def crash():
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(moe.model, tok, tmp_path, 1, {}, before_rename=crash)
    assert not version_dir(tmp_path, 1).exists() and (tmp_path / ".tmp-v1").exists()
    d = write_checkpoint(moe.model, tok, tmp_path, 1, {})  # the redo replaces the leftover
    assert verify(d) and not (tmp_path / ".tmp-v1").exists()
    sha = manifest_sha256(d)
    assert manifest_sha256(write_checkpoint(moe.model, tok, tmp_path, 1, {})) == sha, "same inputs, same manifest"


def test_served_names_are_only_the_manifests(shipped, tmp_path):
    moe, tok = shipped
    d = write_checkpoint(moe.model, tok, tmp_path, 0, {})
    assert manifest_file(d, "config.json") == d / "config.json"
    for name in ("../v0/config.json", "/etc/passwd", "nothing.bin"):
        with pytest.raises(ManifestError):
            manifest_file(d, name)
    write_checkpoint(moe.model, tok, tmp_path, 1, {})
    assert prune(tmp_path, keep={1}) == [0] and not d.exists() and version_dir(tmp_path, 1).exists()


@pytest.fixture
def registry(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    yield Registry(tmp_path / "datasets", ledger, RegistryLimits(heldout_fraction=0.2, max_records=50,
                                                                  max_record_bytes=200))
    ledger.close()


def texts(n):
    return [f"record number {i}: {i} * {i} = {i * i}" for i in range(n)]


def test_register_dedupes_splits_by_hash_and_is_idempotent(registry, tmp_path):
    payload = write_payload(texts(30) + texts(5), tmp_path / "p.jsonl")
    row = registry.register(payload, "math", "squares", "ab" * 32)
    assert (row.records, row.duplicates, row.train_records + row.heldout_records) == (35, 5, 30)
    held = [json.loads(l)["text"] for l in open(registry.root / row.heldout_path)]
    train = [json.loads(l)["text"] for l in open(registry.train_path(row.dataset_id))]
    assert held and all(is_heldout(t, 0.2) for t in held) and not any(is_heldout(t, 0.2) for t in train)
    assert sorted(held + train) == sorted(texts(30)) and list(registry.heldout_texts([row.dataset_id])) == held

    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(payload.read_bytes()))
    assert registry.register(gz, "math", "again", "cd" * 32) == row, "same content: same dataset, stored once"
    assert registry.register(payload, "code", "x", "ab" * 32).dataset_id != row.dataset_id
    assert len(registry.ledger.datasets("math")) == 1 and len(registry.ledger.datasets()) == 2


@pytest.mark.parametrize("content, match", [
    (b'{"text": "ok"}\nnot json\n', "line 2 is not a UTF-8 JSON object"),
    (b'{"body": "ok"}\n', 'line 1 has no string field "text"'),
    (b'["text"]\n', 'line 1 has no string field "text"'),
    (b'{"text": "' + b"y" * 300 + b'"}\n', "over 200 bytes"),
    (b'{"text": "' + b"z" * 2000 + b'"}\n', "over 1,264 characters"),
    (b'{"text": "\\ud800"}\n', "unpaired surrogate"),
    (b'{"text": "\xff\xfe"}\n', "not a UTF-8 JSON object"),
    (b'{"text": "  "}\n\n', "no non-empty records"),
    (gzip.compress(b'{"text": "a"}\n')[:-6], "broken gzip"),
    (b"".join(b'{"text": "r%d"}\n' % i for i in range(51)), "more than 50 records"),
])
def test_bad_payloads_name_the_line_and_store_nothing(registry, tmp_path, content, match):
    (tmp_path / "bad").write_bytes(content)
    with pytest.raises(DatasetError, match=match):
        registry.register(tmp_path / "bad", "math", "bad", "ab" * 32)
    assert registry.ledger.datasets() == [] and [p.name for p in registry.root.iterdir()] == []


def test_spool_moves_payloads_and_sweeps_orphans(tmp_path):
    spool = Spool(tmp_path / "spool")
    for name in ("a", "b"):
        (spool.incoming / name).write_bytes(name.encode())
    kept = spool.store(spool.incoming / "a", 4, "1" * 64)
    orphan = spool.store(spool.incoming / "b", 4, "2" * 64)
    (spool.incoming / "upload-x.part").write_bytes(b"half")
    assert spool.read(kept) == b"a" and not (spool.incoming / "a").exists()
    assert spool.sweep({kept}) == [orphan, "incoming/upload-x.part"]
    assert spool.path(kept).exists() and not spool.path(orphan).exists()
    spool.drop_round(4)
    assert not spool.path(kept).exists()
