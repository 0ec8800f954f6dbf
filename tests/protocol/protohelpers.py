"""Helpers for the protocol tests: a small in-memory ValidatorBackend and a tiny model spec."""
from __future__ import annotations

import hashlib
import tempfile
import threading
import time
from pathlib import Path

import torch

from expertmesh.protocol import identity
from expertmesh.protocol import manifest as mf
from expertmesh.protocol.backend import ValidatorBackend
from expertmesh.protocol.client import sign_upload
from expertmesh.protocol.codec import DeltaSpec, decode_delta
from expertmesh.protocol.errors import Rejected
from expertmesh.protocol.experts import PROJS, expert_key
from expertmesh.protocol.server import ServerConfig
from expertmesh.protocol.types import (Blob, BlobHeader, CheckpointRef, DatasetInfo, DatasetReceipt, NodeStatus, Receipt,
                            RoundInfo, RoundPhase, Submission)

SPEC = DeltaSpec(num_layers=2, num_experts=8, hidden=32, intermediate=16)


def publish_version(directory: Path, version: int = 1) -> bytes:
    """A published version as validators write it (protocol.manifest); returns the manifest's sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text('{"model_type": "test"}')
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * (10 << 10))  # 2.5 MiB: three chunks
    return hashlib.sha256(mf.write(directory, version, {})).digest()


with tempfile.TemporaryDirectory() as _tmp:
    MODEL_SHA = publish_version(Path(_tmp))  # the writer is deterministic: the same files give the same sha


def make_delta(experts: dict[int, list[int]], spec: DeltaSpec = SPEC, seed: int = 0, scale: float = 1e-3):
    g = torch.Generator().manual_seed(seed)
    return {expert_key(l, e, p): torch.randn(spec.shape_of(expert_key(l, e, p)), generator=g) * scale
            for l, es in experts.items() for e in es for p in PROJS}


def _blob(path: Path, name: str, version: int) -> Blob:
    data = path.read_bytes()
    return Blob(BlobHeader(name=name, version=version, size=len(data), sha256=hashlib.sha256(data).digest()), path)


class MemoryBackend(ValidatorBackend):
    """Just enough validator for the transport: one open round, idempotent on digests, decodes deltas."""

    def __init__(self, root: Path, round: int = 1, version: int = 1, domains: tuple[str, ...] = ("math", "code")):
        self.root, self.round, self.version, self.domains = root, round, version, domains
        self.key = identity.generate_key()
        self.receipts: dict[bytes, Receipt | DatasetReceipt] = {}
        self.decoded: dict[bytes, dict[str, torch.Tensor]] = {}
        self.datasets: dict[str, tuple[DatasetInfo, Path]] = {}
        self.admit_calls = self.accept_calls = 0
        self.accept_delay_s = 0.0
        self.fail_status = False
        self._lock = threading.Lock()
        self.published = root / f"v{version}"
        self.model_sha = publish_version(self.published, version)

    def _admit(self, sub: Submission):
        with self._lock:
            self.admit_calls += 1
            if sub.digest in self.receipts:
                return self.receipts[sub.digest]
        if sub.envelope.round != self.round:
            raise Rejected("FAILED_PRECONDITION", f"round {sub.envelope.round} is not open; the open round is {self.round}")
        if sub.envelope.domain not in self.domains:
            raise Rejected("NOT_FOUND", f"domain {sub.envelope.domain!r} is not evaluated here")
        return None

    admit_delta = admit_dataset = _admit

    def accept_delta(self, sub: Submission, payload: Path) -> Receipt:
        time.sleep(self.accept_delay_s)
        data = payload.read_bytes()
        decoded = decode_delta(data, SPEC, max_bytes=1 << 20)
        receipt = Receipt(sub.digest, self.round, len(data), "queued for scoring")
        with self._lock:
            self.accept_calls += 1
            self.receipts[sub.digest] = receipt
            self.decoded[sub.digest] = decoded.tensors
        return receipt

    def accept_dataset(self, sub: Submission, payload: Path) -> DatasetReceipt:
        dataset_id = sub.envelope.payload_sha256.hex()[:16]
        kept = self.root / f"dataset-{dataset_id}"
        payload.rename(kept)  # the backend may take the spooled file
        env = sub.envelope
        info = DatasetInfo(dataset_id, env.domain, env.label, env.public_key, env.payload_size, env.payload_sha256,
                           env.timestamp_ms)
        receipt = DatasetReceipt(sub.digest, dataset_id, "registered")
        with self._lock:
            self.accept_calls += 1
            self.datasets[dataset_id] = (info, kept)
            self.receipts[sub.digest] = receipt
        return receipt

    def list_datasets(self, domain):
        return [info for info, _ in self.datasets.values() if domain is None or info.domain == domain]

    def dataset_blob(self, dataset_id):
        if dataset_id not in self.datasets:
            raise Rejected("NOT_FOUND", f"no dataset {dataset_id!r}")
        return _blob(self.datasets[dataset_id][1], dataset_id, 0)

    def manifest_blob(self, version):
        if version not in (None, self.version):
            raise Rejected("NOT_FOUND", f"version {version} is not published")
        return _blob(self.published / mf.MANIFEST, mf.MANIFEST, self.version)

    def checkpoint_blob(self, ref: CheckpointRef):
        if ref.version != self.version or ref.name not in mf.read(self.published).files:
            raise Rejected("NOT_FOUND", f"no file {ref.name!r} in version {ref.version}")
        return _blob(self.published / ref.name, ref.name, self.version)

    def current_round(self):
        return RoundInfo(self.round, self.version, self.model_sha, RoundPhase.OPEN, self.domains, 1_900_000_000_000, 0.05)

    def status(self):
        if self.fail_status:
            raise RuntimeError("a bug inside the backend")
        return NodeStatus(identity.public_bytes(self.key), "validator", "0.1.0", self.version, self.round, 5)


FAST = ServerConfig(idle_timeout_s=1.0, max_rpc_s=30.0, max_workers=12, max_concurrent_rpcs=12, max_uploads=4,
                    max_uploads_per_host=4, max_downloads=4)


def signed(kind, key, payload: bytes, **overrides):
    fields = dict(model_version=1, model_sha256=MODEL_SHA, round=1, domain="math", label="")
    fields.update(overrides)
    return sign_upload(kind, key, payload, **fields)
