"""Ed25519 node identities: key files, key ids, raw sign/verify.

A key file is the private key as unencrypted PKCS#8 PEM, mode 0600 (like an ssh key; a file that
others can read is refused). The key id is the lowercase hex of the 32-byte raw public key: exact
(allow/deny lists and DHT records compare it) and stable across tools.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from expertmesh.protocol.errors import BadSignature
from expertmesh.protocol.types import KEY_BYTES, SIG_BYTES

MAX_KEYFILE_BYTES = 4096


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: bytes) -> str:
    assert len(public_key) == KEY_BYTES
    return public_key.hex()


def parse_key_id(text: str) -> bytes:
    """The raw public key named by a key id (64 hex characters)."""
    text = text.strip().lower()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != KEY_BYTES:
        raise ValueError(f"not a key id: {text[:80]!r} (want the 64 hex characters `expertmesh keygen` prints)")
    return raw


def save_key(key: Ed25519PrivateKey, path: Path, *, overwrite: bool = False) -> None:
    """Write the key with mode 0600 from the first byte on (never briefly world-readable)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    exists = f"{path} already exists; pass --force to replace it (the old identity is lost)"
    if path.exists() and not overwrite:
        raise FileExistsError(exists)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.chmod(tmp, 0o600)  # the umask may have narrowed it further; never wider
        if overwrite:
            os.replace(tmp, path)
        else:  # link, unlike replace, refuses an existing name: two runs at once cannot both write it
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(exists) from None
    finally:
        tmp.unlink(missing_ok=True)


def load_key(path: Path) -> Ed25519PrivateKey:
    st = path.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"key file {path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                         f"run `chmod 600 {path}`")
    if st.st_size > MAX_KEYFILE_BYTES:
        raise ValueError(f"{path} is not an expertmesh key file (too large); create one with `expertmesh keygen`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an unencrypted PEM private key ({exc}); create one with `expertmesh keygen`")
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 key; create one with `expertmesh keygen`")
    return key


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    return key.sign(message)


def verify(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Raise BadSignature unless `signature` is public_key's signature of message."""
    if len(public_key) != KEY_BYTES or len(signature) != SIG_BYTES:
        raise BadSignature("bad signature: wrong key or signature length")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise BadSignature("bad signature: it does not verify under the sender's public key") from None
