"""Calling a validator: every call has a deadline, uploads stream from disk, downloads spool to disk.

Miners and dataset submitters use `sign_upload` to make the envelope and `ValidatorClient` to send it.
A refused call raises RemoteError (a ConnectionError) carrying the gRPC status name and the
validator's message; a download that does not match its header raises the same errors a server
would (Oversize, PayloadMismatch).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from expertmesh.protocol import commit as commit_mod
from expertmesh.protocol import identity
from expertmesh.protocol import envelope as envelope_mod
from expertmesh.protocol import expertmesh_pb2_grpc as pbg
from expertmesh.protocol import serde, streams
from expertmesh.protocol.errors import Overloaded, RemoteError
from expertmesh.protocol.types import (BlobHeader, CheckpointRef, DatasetInfo, DatasetReceipt, NodeStatus, Receipt, RoundInfo,
                            SignedEnvelope)

T = TypeVar("T")


@dataclass(frozen=True)
class ClientConfig:
    call_timeout_s: float = 10.0  # deadline of every small call
    upload_timeout_s: float = 60.0  # base deadline of an upload, plus size / min_upload_rate
    min_upload_rate: float = float(1 << 20)  # bytes/s the deadline allows for; slower links time out
    download_timeout_s: float = 1800.0
    chunk_bytes: int = streams.CHUNK_BYTES
    max_download_bytes: int = 64 << 30
    max_manifest_bytes: int = 16 << 20
    busy_retries: int = 6  # an upload the validator answers UNAVAILABLE (all its upload slots busy) is resent

    def __post_init__(self) -> None:
        if not 0 < self.call_timeout_s <= 3600 or not 0 < self.upload_timeout_s <= 86_400 \
                or not 0 < self.download_timeout_s <= 86_400:
            raise ValueError("timeouts must be positive and at most a day (small calls: an hour)")
        if not 1024 <= self.min_upload_rate:
            raise ValueError(f"min_upload_rate={self.min_upload_rate} must be at least 1024 bytes/s")
        if not 4096 <= self.chunk_bytes <= 16 << 20:
            raise ValueError(f"chunk_bytes={self.chunk_bytes} must be within [4 KiB, 16 MiB]")
        if not 1 <= self.max_manifest_bytes <= self.max_download_bytes:
            raise ValueError("need 1 <= max_manifest_bytes <= max_download_bytes")

    @property
    def max_message_bytes(self) -> int:
        return self.chunk_bytes + streams.ENVELOPE_ALLOWANCE


def sign_upload(kind: str, key: Ed25519PrivateKey, payload: bytes | Path, *, model_version: int, model_sha256: bytes,
                round: int, domain: str, label: str = "") -> SignedEnvelope:
    """The signed envelope for uploading `payload` as a "delta" or a "dataset" (fresh nonce, now)."""
    sha, size = streams.hash_payload(payload)
    env = envelope_mod.new_envelope(key, payload_sha256=sha, payload_size=size, model_version=model_version,
                                    model_sha256=model_sha256, round=round, domain=domain, label=label)
    return envelope_mod.sign_envelope(kind, env, key)


def sign_commit(key: Ed25519PrivateKey, payload: bytes | Path, *, model_version: int, model_sha256: bytes,
                round: int, domain: str, pow_bits: int = 0) -> SignedEnvelope:
    """The CommitDelta envelope for a delta `payload` (protocol.commit): its commitment, with a proof of
    work of `pow_bits` (the round's RoundInfo.pow_bits)."""
    sha, size = streams.hash_payload(payload)
    public_key = identity.public_bytes(key)
    commit = commit_mod.commitment(public_key, sha)
    env = envelope_mod.new_envelope(key, payload_sha256=commit, payload_size=size, model_version=model_version,
                                    model_sha256=model_sha256, round=round, domain=domain,
                                    label=commit_mod.solve(public_key, commit, pow_bits))
    return envelope_mod.sign_envelope("commit", env, key)


class ValidatorClient:
    """One channel to one validator: `with ValidatorClient("host:port") as c: c.get_round()`."""

    def __init__(self, address: str, config: ClientConfig = ClientConfig()):
        self.address, self.config = address, config
        opts = [("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes)]
        self._channel = grpc.insecure_channel(address, options=opts)
        self._stub = pbg.ValidatorStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ValidatorClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- uploads -------------------------------------------------------------------------------
    def commit_delta(self, envelope: SignedEnvelope) -> Receipt:
        """Commit to a delta's payload before uploading it (sign_commit makes the envelope)."""
        m = _call("CommitDelta", lambda: self._stub.CommitDelta(serde.signed_envelope_to_proto(envelope),
                                                                timeout=self.config.call_timeout_s))
        return serde.receipt_from_proto(m)

    def submit_delta(self, payload: bytes | Path, envelope: SignedEnvelope, timeout_s: float | None = None) -> Receipt:
        m = self._upload("SubmitDelta", self._stub.SubmitDelta, payload, envelope, timeout_s)
        return serde.receipt_from_proto(m)

    def register_dataset(self, payload: bytes | Path, envelope: SignedEnvelope,
                         timeout_s: float | None = None) -> DatasetReceipt:
        m = self._upload("RegisterDataset", self._stub.RegisterDataset, payload, envelope, timeout_s)
        return serde.dataset_receipt_from_proto(m)

    def _upload(self, method: str, rpc, payload: bytes | Path, envelope: SignedEnvelope, timeout_s: float | None):
        size = len(payload) if isinstance(payload, bytes) else Path(payload).stat().st_size
        deadline = timeout_s or self.config.upload_timeout_s + size / self.config.min_upload_rate

        def frames() -> Iterator:
            first = True
            for piece in streams.iter_chunks(payload, self.config.chunk_bytes):
                yield serde.upload_frame_to_proto(envelope if first else None, piece)
                first = False
            if first:  # an empty payload still sends its envelope
                yield serde.upload_frame_to_proto(envelope, b"")

        for attempt in range(self.config.busy_retries + 1):
            try:
                return _call(method, lambda: rpc(frames(), timeout=deadline))
            except RemoteError as exc:  # the same signed envelope again is a resubmission: never taken twice
                busy = exc.code == "UNAVAILABLE" and exc.details.startswith(Overloaded.prefix)
                if not busy or attempt == self.config.busy_retries:
                    raise
                time.sleep(min(8.0, 0.25 * 2 ** attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    # --- downloads -----------------------------------------------------------------------------
    def fetch_manifest(self, out_path: Path, version: int | None = None,
                       expected_sha256: bytes | None = None) -> BlobHeader:
        request = serde.manifest_request_to_proto(version)
        return self._download("GetManifest", self._stub.GetManifest, request, out_path,
                              self.config.max_manifest_bytes, expected_sha256)

    def fetch_checkpoint_file(self, ref: CheckpointRef, out_path: Path,
                              expected_sha256: bytes | None = None) -> BlobHeader:
        return self._download("GetCheckpoint", self._stub.GetCheckpoint, serde.checkpoint_ref_to_proto(ref), out_path,
                              self.config.max_download_bytes, expected_sha256)

    def fetch_dataset(self, dataset_id: str, out_path: Path, expected_sha256: bytes | None = None) -> BlobHeader:
        return self._download("GetDataset", self._stub.GetDataset, serde.dataset_request_to_proto(dataset_id),
                              out_path, self.config.max_download_bytes, expected_sha256)

    def _download(self, method: str, rpc, request, out_path: Path, max_bytes: int,
                  expected_sha256: bytes | None) -> BlobHeader:
        call = rpc(request, timeout=self.config.download_timeout_s)
        try:
            frames = (serde.blob_frame_from_proto(m) for m in call)
            return _call(method, lambda: streams.receive_blob(frames, Path(out_path), max_bytes=max_bytes,
                                                              expected_sha256=expected_sha256))
        finally:
            call.cancel()  # no-op when complete; stops the server streaming after a refused header

    # --- small calls ---------------------------------------------------------------------------
    def list_datasets(self, domain: str | None = None) -> list[DatasetInfo]:
        m = _call("ListDatasets", lambda: self._stub.ListDatasets(serde.dataset_query_to_proto(domain),
                                                                  timeout=self.config.call_timeout_s))
        return serde.dataset_list_from_proto(m)

    def get_round(self) -> RoundInfo:
        m = _call("GetRound", lambda: self._stub.GetRound(serde.round_query_to_proto(), timeout=self.config.call_timeout_s))
        return serde.round_info_from_proto(m)

    def status(self) -> NodeStatus:
        m = _call("Status", lambda: self._stub.Status(serde.status_request_to_proto(), timeout=self.config.call_timeout_s))
        return serde.node_status_from_proto(m)


def _call(method: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except grpc.RpcError as exc:
        raise RemoteError(method, exc.code().name, exc.details() or "") from None
