"""A small, real ValidatorBackend for miner and dataset-submission tests (served by the real gRPC server).

It publishes the shipped model as version 0 (its files plus a manifest with sha256 per file),
registers datasets the way validators do (gzip/plain JSON Lines of {"text"}, deduplicated, split
by content hash, held-out kept here), and takes deltas into the open round, decoding each against
the model's expert shapes. Rounds move only when the test says so. Every call is counted, so tests
can check exactly what a client sent.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import threading
from pathlib import Path

from expertmesh.protocol.heldout import DEFAULT_FRACTION, content_hash, is_heldout
from expertmesh.node.moe import read_config
from expertmesh.protocol import manifest as mf
from expertmesh.protocol import identity
from expertmesh.protocol.backend import ValidatorBackend
from expertmesh.protocol.codec import DeltaSpec, decode_delta
from expertmesh.protocol.errors import Rejected
from expertmesh.protocol.types import (Blob, BlobHeader, CheckpointRef, DatasetInfo, DatasetReceipt, NodeStatus, Receipt,
                            RoundInfo, RoundPhase, Submission)


def _sha(path: Path) -> bytes:
    return hashlib.sha256(path.read_bytes()).digest()


def publish(model_dir: Path, out: Path, version: int) -> bytes:
    """Copy a checkpoint to `out` with a manifest; returns the manifest's sha256."""
    out.mkdir(parents=True)
    for f in sorted(p for p in model_dir.iterdir() if p.is_file() and p.name != mf.MANIFEST):
        shutil.copy(f, out / f.name)
    return hashlib.sha256(mf.write(out, version, {})).digest()


def _payload_texts(path: Path) -> list[str]:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    texts = []
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        rec = json.loads(line) if line.strip() else None
        if rec is not None:
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise Rejected("INVALID_ARGUMENT", f'line {n} has no string field "text"')
            texts.append(rec["text"])
    return texts


class FakeValidator(ValidatorBackend):
    def __init__(self, root: Path, model_dir: Path, domains: tuple[str, ...] = ()):
        self.root = root
        self.key = identity.generate_key()
        self.versions = {0: (root / "v0", publish(model_dir, root / "v0", 0))}
        cfg = read_config(model_dir)
        self.spec = DeltaSpec(cfg["num_hidden_layers"], cfg["num_experts"] if "num_experts" in cfg
                              else cfg["num_local_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"])
        self.round, self.version, self.phase = 1, 0, RoundPhase.OPEN
        self.heldout_fraction = DEFAULT_FRACTION  # stated in its rounds, as a validator's is
        self.fixed_domains = domains
        self.datasets: dict[str, tuple[DatasetInfo, Path, int, int]] = {}  # id -> info, train path, train, held
        self.receipts: dict[bytes, Receipt | DatasetReceipt] = {}
        self.deltas: list[tuple[Submission, dict]] = []  # accepted deltas in arrival order
        self.dataset_uploads = 0
        self.admit_delta_calls = 0
        self.refuse: str | None = None  # a reason to refuse every delta (e.g. a version that moved on)
        self._lock = threading.Lock()

    # --- test controls -------------------------------------------------------------------------
    def next_round(self) -> None:
        with self._lock:
            self.round += 1

    def deltas_for(self, round_number: int) -> list[tuple[Submission, dict]]:
        return [(s, d) for s, d in self.deltas if s.envelope.round == round_number]

    # --- backend -------------------------------------------------------------------------------
    def domains(self) -> tuple[str, ...]:
        return self.fixed_domains or tuple(sorted({i.domain for i, *_ in self.datasets.values()}))

    def admit_delta(self, sub: Submission) -> Receipt | None:
        with self._lock:
            self.admit_delta_calls += 1
            if sub.digest in self.receipts:
                return self.receipts[sub.digest]
            env = sub.envelope
            if self.phase != RoundPhase.OPEN or env.round != self.round:
                raise Rejected("FAILED_PRECONDITION", f"round {env.round} is not open (round {self.round} is)")
            if self.refuse is not None:
                raise Rejected("FAILED_PRECONDITION", self.refuse)
            if env.model_version != self.version or env.model_sha256 != self.versions[self.version][1]:
                raise Rejected("FAILED_PRECONDITION", f"delta is for version {env.model_version}, not {self.version}")
            for s, _ in self.deltas:  # as validators do: the same payload again is the same submission
                if s.envelope.public_key == env.public_key and s.envelope.round == env.round:
                    if s.envelope.payload_sha256 == env.payload_sha256:
                        return self.receipts[s.digest]
                    raise Rejected("ALREADY_EXISTS", "this key already submitted in this round")
        return None

    def accept_delta(self, sub: Submission, payload: Path) -> Receipt:
        try:
            decoded = decode_delta(payload.read_bytes(), self.spec)
        except ValueError as exc:
            raise Rejected("INVALID_ARGUMENT", str(exc)) from None
        receipt = Receipt(sub.digest, sub.envelope.round, sub.envelope.payload_size, "queued for scoring")
        with self._lock:
            self.deltas.append((sub, decoded.tensors))
            self.receipts[sub.digest] = receipt
        return receipt

    def admit_dataset(self, sub: Submission) -> DatasetReceipt | None:
        with self._lock:
            return self.receipts.get(sub.digest)

    def accept_dataset(self, sub: Submission, payload: Path) -> DatasetReceipt:
        texts = _payload_texts(payload)
        seen, train, held = set(), [], 0
        for t in texts:
            h = content_hash(t)
            if h not in seen:
                seen.add(h)
                held += is_heldout(t, self.heldout_fraction)
                if not is_heldout(t, self.heldout_fraction):
                    train.append(t)
        env = sub.envelope
        dataset_id = f"{env.domain}-{hashlib.sha256(''.join(sorted(seen)).encode()).hexdigest()[:12]}"
        path = self.root / f"{dataset_id}.train.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in train))
        info = DatasetInfo(dataset_id, env.domain, env.label, env.public_key, path.stat().st_size, _sha(path),
                           env.timestamp_ms)
        receipt = DatasetReceipt(sub.digest, dataset_id, f"{len(texts)} records: train {len(train)}, held-out {held}")
        with self._lock:
            self.dataset_uploads += 1
            self.datasets[dataset_id] = (info, path, len(train), held)
            self.receipts[sub.digest] = receipt
        return receipt

    def list_datasets(self, domain: str | None) -> list[DatasetInfo]:
        return [i for i, *_ in self.datasets.values() if domain is None or i.domain == domain]

    def dataset_blob(self, dataset_id: str) -> Blob:
        if dataset_id not in self.datasets:
            raise Rejected("NOT_FOUND", f"no dataset {dataset_id!r}")
        info, path, *_ = self.datasets[dataset_id]
        return Blob(BlobHeader(f"{dataset_id}.train.jsonl", 0, info.size, info.sha256), path)

    def manifest_blob(self, version: int | None) -> Blob:
        v = self.version if version is None else version
        if v not in self.versions:
            raise Rejected("NOT_FOUND", f"version {v} is not published")
        path = self.versions[v][0] / "manifest.json"
        return Blob(BlobHeader("manifest.json", v, path.stat().st_size, _sha(path)), path)

    def checkpoint_blob(self, ref: CheckpointRef) -> Blob:
        directory = self.versions.get(ref.version, (None,))[0]
        if directory is None or ref.name not in mf.read(directory).files:
            raise Rejected("NOT_FOUND", f"no file {ref.name!r} in version {ref.version}")
        path = directory / ref.name
        return Blob(BlobHeader(ref.name, ref.version, path.stat().st_size, _sha(path)), path)

    def current_round(self) -> RoundInfo:
        return RoundInfo(self.round, self.version, self.versions[self.version][1], self.phase, self.domains(),
                         1_900_000_000_000, self.heldout_fraction)

    def status(self) -> NodeStatus:
        return NodeStatus(identity.public_bytes(self.key), "validator", "fake/0", self.version, self.round, 1)
