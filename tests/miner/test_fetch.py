"""Fetching a published version: every file against the manifest, cached, resumable, hostile names refused."""
from __future__ import annotations

import hashlib
import json

import pytest

from expertmesh.node.fetch import CheckpointCache, tokenizer_files
from expertmesh.protocol.manifest import ManifestError, parse, read
from expertmesh.protocol.client import ValidatorClient
from expertmesh.protocol.errors import PayloadMismatch


class CountingClient(ValidatorClient):
    def __init__(self, address):
        super().__init__(address)
        self.fetched: list[str] = []

    def fetch_checkpoint_file(self, ref, out_path, expected_sha256=None):
        self.fetched.append(ref.name)
        return super().fetch_checkpoint_file(ref, out_path, expected_sha256)


def test_fetch_verifies_caches_and_resumes(validator, tmp_path):
    rnd_sha = validator.current_round().model_sha256
    cache = CheckpointCache(tmp_path / "models")
    published = validator.version(0)[0]
    listed = read(published).files
    with CountingClient(validator.address) as client:
        # A file the server changed after publishing: refused before a byte lands, good files are kept.
        weights = published / "model.safetensors"
        original = weights.read_bytes()
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(PayloadMismatch):
            cache.ensure(client, 0, rnd_sha)
        part = next((tmp_path / "models").glob(".partial-v0-*"))
        assert not (part / "model.safetensors").exists() and not list((tmp_path / "models").glob("v0-*"))

        weights.write_bytes(original)  # repaired: the next try fetches only what is missing
        before = list(client.fetched)
        directory = cache.ensure(client, 0, rnd_sha)
        again = client.fetched[len(before):]
        assert set(again) & set(before) == {"model.safetensors"}  # what had verified is not fetched again
        assert set(before) | set(again) == set(listed)
        for name, (sha, _) in listed.items():
            assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == sha

        n = len(client.fetched)
        assert cache.ensure(client, 0, rnd_sha) == directory and len(client.fetched) == n  # cached
        (directory / "config.json").write_text("{}")  # damaged locally: fetched again, nothing else
        assert cache.ensure(client, 0, rnd_sha) == directory and client.fetched[n:] == ["config.json"]

        with pytest.raises(Exception) as err:  # a manifest sha256 the round did not name is never used
            CheckpointCache(tmp_path / "other").ensure(client, 0, b"\x01" * 32)
        assert "sha256" in str(err.value)

        tok = CheckpointCache(tmp_path / "tok").ensure(client, 0, rnd_sha, wanted=tokenizer_files)
        assert (tok / "tokenizer.json").is_file() and not list(tok.glob("*.safetensors"))


@pytest.mark.parametrize("name", ["../evil.json", "/etc/passwd.json", "model.bin", "weights.pt", "run.py",
                                  ".hidden.json", "a/../../b.json", "manifest.json", "x\n.json"])
def test_hostile_manifest_names_are_refused(name):
    doc = {"version": 1, "files": {"config.json": {"sha256": "a" * 64, "size": 1},
                                   "model.safetensors": {"sha256": "b" * 64, "size": 1},
                                   name: {"sha256": "c" * 64, "size": 1}}}
    with pytest.raises(ManifestError):
        parse(json.dumps(doc).encode(), b"", 1)


def test_malformed_manifests_are_refused():
    good = {"version": 2, "files": {"config.json": {"sha256": "a" * 64, "size": 1},
                                    "model.safetensors": {"sha256": "b" * 64, "size": 3}}}
    assert parse(json.dumps(good).encode(), b"", 2).files["model.safetensors"] == ("b" * 64, 3)
    for bad in (b"not json", b"[]", json.dumps({**good, "version": 3}).encode(),
                json.dumps({"version": 2, "files": {"config.json": {"sha256": "a" * 64, "size": 1}}}).encode(),
                json.dumps({"version": 2, "files": {**good["files"], "x.json": {"sha256": "zz", "size": 1}}}).encode(),
                json.dumps({"version": 2, "files": {**good["files"], "x.json": {"sha256": "a" * 64, "size": -1}}}).encode()):
        with pytest.raises(ManifestError):
            parse(bad, b"", 2)
