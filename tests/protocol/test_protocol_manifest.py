"""The manifest format: what the validator writes is what a miner reads and verifies, and nothing else."""
from __future__ import annotations

import hashlib

import pytest

from expertmesh.protocol import manifest as mf


def _version(d):
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"weights")
    return d


def test_written_manifests_read_back_verify_and_are_deterministic(tmp_path):
    d = _version(tmp_path / "v3")
    data = mf.write(d, 3, {"parent": 2, "round": 3})
    m = mf.read(d, 3)
    assert m.sha256 == hashlib.sha256(data).digest() and m.doc["parent"] == 2
    assert m.files["model.safetensors"] == (hashlib.sha256(b"weights").hexdigest(), 7)
    assert mf.verify(d).files == m.files
    assert mf.write(d, 3, {"round": 3, "parent": 2}) == data  # same files and fields: same bytes
    (d / "model.safetensors").write_bytes(b"weighty")
    assert mf.bad_files(d, m) == ["model.safetensors"]
    with pytest.raises(mf.ManifestError, match="model.safetensors"):
        mf.verify(d)
    with pytest.raises(mf.ManifestError, match="version 3, not the requested 4"):
        mf.read(d, 4)


def test_the_writer_refuses_what_a_miner_would_refuse(tmp_path):
    d = _version(tmp_path / "v1")
    (d / "pytorch_model.bin").write_bytes(b"a pickle")
    with pytest.raises(mf.ManifestError, match="pytorch_model.bin"):
        mf.write(d, 1, {})
    assert not (d / mf.MANIFEST).exists()
