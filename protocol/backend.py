"""What a validator implements for protocol.server: domain functions on plain dataclasses.

The server has already done the transport's part when these are called: the envelope is parsed,
its signature, key, timestamp, size and nonce are checked (protocol.admission), and for `accept_*`
the payload is on disk with its size and sha256 verified. A backend refuses a well-formed request
by raising protocol.errors.Rejected(status, message); any other exception is a bug, answered with
INTERNAL and logged, and never takes the server down. Methods are called from several server
threads at once: a backend must be thread-safe.

Idempotency contract: `Submission.digest` identifies a signed submission. When a backend already
holds a submission with that digest, `admit_*` returns the receipt it gave the first time (the
server then answers without reading the payload again). `Submission.resubmission` only says this
server process saw the digest recently; the backend's own ledger is the authority.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from expertmesh.protocol.errors import Rejected
from expertmesh.protocol.types import (Blob, CheckpointRef, DatasetInfo, DatasetReceipt, NodeStatus, Receipt, RoundInfo,
                            Submission)


class ValidatorBackend(ABC):
    def commit_delta(self, sub: Submission) -> Receipt:
        """Record a commitment (protocol.commit; `sub.envelope.payload_sha256` is the commitment itself).

        The same commitment again returns the first receipt. A backend without commit-then-reveal
        refuses it (UNIMPLEMENTED)."""
        raise Rejected("UNIMPLEMENTED", "this node does not take commitments")

    @abstractmethod
    def admit_delta(self, sub: Submission) -> Receipt | None:
        """Cheap checks on the header alone (round open? domain evaluated here? model version?).

        Return the earlier receipt for a known digest, None to go on and receive the payload.
        """

    @abstractmethod
    def accept_delta(self, sub: Submission, payload: Path) -> Receipt:
        """Take a verified payload. The backend may move `payload` away; what is left there is deleted."""

    @abstractmethod
    def admit_dataset(self, sub: Submission) -> DatasetReceipt | None:
        """As admit_delta, for a dataset registration (`sub.envelope.label` is the dataset's name)."""

    @abstractmethod
    def accept_dataset(self, sub: Submission, payload: Path) -> DatasetReceipt:
        """As accept_delta, for a dataset registration."""

    @abstractmethod
    def list_datasets(self, domain: str | None) -> list[DatasetInfo]:
        """Registered datasets, of one domain or of all (domain None)."""

    @abstractmethod
    def dataset_blob(self, dataset_id: str) -> Blob:
        """The train part of a dataset, for miners. Never the held-out part."""

    @abstractmethod
    def manifest_blob(self, version: int | None) -> Blob:
        """A published version's manifest (version None: the latest)."""

    @abstractmethod
    def checkpoint_blob(self, ref: CheckpointRef) -> Blob:
        """One file of a published checkpoint, by the name its manifest lists."""

    @abstractmethod
    def current_round(self) -> RoundInfo: ...

    @abstractmethod
    def status(self) -> NodeStatus: ...
