"""Key files: 0600 from the start, refused when readable by others; key ids."""
from __future__ import annotations

import os
import stat

import pytest

from expertmesh.protocol import identity
from expertmesh.protocol.errors import BadSignature


def test_save_load_sign_verify(tmp_path):
    key = identity.generate_key()
    path = tmp_path / "node.key"
    identity.save_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = identity.load_key(path)
    pub = identity.public_bytes(loaded)
    assert pub == identity.public_bytes(key)
    sig = identity.sign(loaded, b"msg")
    identity.verify(pub, sig, b"msg")
    with pytest.raises(BadSignature):
        identity.verify(pub, sig, b"msg!")
    with pytest.raises(BadSignature):
        identity.verify(pub[:31], sig, b"msg")
    assert identity.parse_key_id(identity.key_id(pub).upper()) == pub


def test_key_file_mistakes(tmp_path):
    path = tmp_path / "node.key"
    identity.save_key(identity.generate_key(), path)
    with pytest.raises(FileExistsError, match="--force"):
        identity.save_key(identity.generate_key(), path)
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        identity.load_key(path)
    junk = tmp_path / "junk.key"
    junk.write_text("not a key")
    os.chmod(junk, 0o600)
    with pytest.raises(ValueError, match="expertmesh keygen"):
        identity.load_key(junk)
    with pytest.raises(ValueError, match="64 hex"):
        identity.parse_key_id("abc")
