"""The validator's protocol backend: uploads go to Intake, reads come from the ledger and the disk.

Each method is one call into the validator's domain objects; the transport (protocol.server) does
framing, admission and error mapping around it. Nothing here touches the model, so answering a
peer never waits for scoring or merging.
"""
from __future__ import annotations

import time
from pathlib import Path

from expertmesh.protocol.backend import ValidatorBackend
from expertmesh.protocol.errors import Rejected
from expertmesh.protocol.types import (Blob, BlobHeader, CheckpointRef, DatasetInfo, DatasetReceipt, NodeStatus, Receipt,
                            RoundInfo, RoundPhase, Submission)
from expertmesh.validator.intake import Intake
from expertmesh.validator.ledger import Ledger
from expertmesh.protocol.files import file_sha256
from expertmesh.protocol import manifest as mf
from expertmesh.protocol.manifest import MANIFEST, ManifestError
from expertmesh.validator.publish import manifest_file, version_dir
from expertmesh.validator.registry import DatasetError, Registry
from expertmesh.validator.rounds import RoundBook

SOFTWARE_VERSION = "expertmesh-validator/0.1.0"


class ValidatorService(ValidatorBackend):
    def __init__(self, intake: Intake, ledger: Ledger, book: RoundBook, registry: Registry, checkpoints: Path,
                 public_key: bytes):
        self.intake, self.ledger, self.book, self.registry = intake, ledger, book, registry
        self.checkpoints, self.public_key = checkpoints, public_key
        self.started = time.monotonic()

    # --- uploads -------------------------------------------------------------------------------
    def commit_delta(self, sub: Submission) -> Receipt:
        return self.intake.commit_delta(sub)

    def admit_delta(self, sub: Submission) -> Receipt | None:
        return self.intake.admit_delta(sub)

    def accept_delta(self, sub: Submission, payload: Path) -> Receipt:
        return self.intake.accept_delta(sub, payload)

    def admit_dataset(self, sub: Submission) -> DatasetReceipt | None:
        return self.intake.admit_dataset(sub)

    def accept_dataset(self, sub: Submission, payload: Path) -> DatasetReceipt:
        return self.intake.accept_dataset(sub, payload)

    # --- reads ---------------------------------------------------------------------------------
    def list_datasets(self, domain: str | None) -> list[DatasetInfo]:
        return [DatasetInfo(dataset_id=r.dataset_id, domain=r.domain, name=r.name[:128] or r.dataset_id,
                            owner_key=bytes.fromhex(r.owner), size=r.train_bytes, sha256=bytes.fromhex(r.train_sha256),
                            registered_ms=r.registered_ms) for r in self.ledger.datasets(domain)]

    def dataset_blob(self, dataset_id: str) -> Blob:
        try:
            path = self.registry.train_path(dataset_id)
        except DatasetError as exc:
            raise Rejected("NOT_FOUND", str(exc)) from None
        row = self.ledger.dataset(dataset_id)
        return Blob(BlobHeader(name=f"{dataset_id}.train.jsonl", version=0, size=row.train_bytes,
                               sha256=bytes.fromhex(row.train_sha256)), path)

    def _live_version(self, version: int | None) -> int:
        rows = [v for v in self.ledger.versions() if not v.pruned]
        if version is None:
            return rows[-1].version
        if version not in {v.version for v in rows}:
            raise Rejected("NOT_FOUND", f"version {version} is not served here (live versions: "
                           f"{[v.version for v in rows]}); fetch the latest")
        return version

    def manifest_blob(self, version: int | None) -> Blob:
        v = self._live_version(version)
        path = version_dir(self.checkpoints, v) / MANIFEST
        return Blob(BlobHeader(name=MANIFEST, version=v, size=path.stat().st_size,
                               sha256=bytes.fromhex(self.ledger.version(v).manifest_sha256)), path)

    def checkpoint_blob(self, ref: CheckpointRef) -> Blob:
        directory = version_dir(self.checkpoints, self._live_version(ref.version))
        try:
            path = manifest_file(directory, ref.name)
        except ManifestError as exc:
            raise Rejected("NOT_FOUND", str(exc)) from None
        listed = mf.read(directory).files.get(ref.name)
        sha = listed[0] if listed else file_sha256(path)  # listed files: no need to hash gigabytes again
        return Blob(BlobHeader(name=ref.name, version=ref.version, size=path.stat().st_size, sha256=bytes.fromhex(sha)),
                    path)

    def current_round(self) -> RoundInfo:
        row = self.book.current()
        base = self.ledger.version(row.base_version)
        phase = RoundPhase.OPEN if row.state == "open" else RoundPhase.CLOSED
        return RoundInfo(round=row.round, model_version=row.base_version,
                         model_sha256=bytes.fromhex(base.manifest_sha256), phase=phase,
                         domains=tuple(self.intake.scored_domains()), closes_at_ms=row.deadline_ms,
                         heldout_fraction=self.registry.limits.heldout_fraction,
                         pow_bits=self.intake.cfg.admission.pow_bits)

    def status(self) -> NodeStatus:
        return NodeStatus(public_key=self.public_key, role="validator", software_version=SOFTWARE_VERSION,
                          model_version=self.ledger.latest_version().version, round=self.book.current().round,
                          uptime_s=int(time.monotonic() - self.started))
