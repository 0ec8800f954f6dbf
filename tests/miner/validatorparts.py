"""The real validator for miner and dataset-submission tests, minus its scheduler.

`build_node` composes the validator exactly as `expertmesh validator run` does (ledger, registry,
spool, round book, intake, service, version 0 published from the shipped model) in a temporary
state directory; the real gRPC server serves it. Nothing scores or merges: rounds move only when a
test says so. `Delegate` sits between the server and the service: it counts calls and, when told
to, refuses deltas; everything else is the service's own answer.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch

from expertmesh.node.moe import load_model
from expertmesh.protocol import identity
from expertmesh.protocol import manifest as mf
from expertmesh.protocol.backend import ValidatorBackend
from expertmesh.protocol.codec import decode_delta
from expertmesh.protocol.errors import Rejected
from expertmesh.protocol.types import Submission
from expertmesh.validator.config import ValidatorConfig
from expertmesh.validator.daemon import ValidatorNode, build_node
from expertmesh.validator.ledger import SubmissionRow, VersionRow
from expertmesh.validator.publish import manifest_sha256, version_dir, write_checkpoint
from expertmesh.validator.rounds import now_ms


class Delegate(ValidatorBackend):
    """The validator's service, with call counts and an optional refusal of every delta."""

    def __init__(self, node: ValidatorNode):
        self.node, self.service = node, node.service
        self.refuse: str | None = None
        self.admit_delta_calls = self.dataset_uploads = 0
        self._lock = threading.Lock()

    def commit_delta(self, sub: Submission):
        return self.service.commit_delta(sub)

    def admit_delta(self, sub: Submission):
        with self._lock:
            self.admit_delta_calls += 1
        if self.refuse is not None:
            raise Rejected("FAILED_PRECONDITION", self.refuse)
        return self.service.admit_delta(sub)

    def accept_delta(self, sub, payload):
        return self.service.accept_delta(sub, payload)

    def admit_dataset(self, sub):
        return self.service.admit_dataset(sub)

    def accept_dataset(self, sub, payload):
        receipt = self.service.accept_dataset(sub, payload)
        with self._lock:
            self.dataset_uploads += 1
        return receipt

    def list_datasets(self, domain):
        return self.service.list_datasets(domain)

    def dataset_blob(self, dataset_id):
        return self.service.dataset_blob(dataset_id)

    def manifest_blob(self, version):
        return self.service.manifest_blob(version)

    def checkpoint_blob(self, ref):
        return self.service.checkpoint_blob(ref)

    def current_round(self):
        return self.service.current_round()

    def status(self):
        return self.service.status()


class Validator(Delegate):
    """A validator in `state_dir` (real parts, no scheduler) and the test's controls over it."""

    def __init__(self, state_dir: Path):
        cfg = ValidatorConfig(state_dir=state_dir, rounds={"duration_s": 86_400},
                              admission={"pow_bits": 8})  # cheap proof of work: the miner still solves it
        super().__init__(build_node(cfg))
        self.address = ""  # set once a server serves it

    @property
    def checkpoints(self) -> Path:
        return self.node.cfg.state_dir / "checkpoints"

    def version(self, number: int) -> tuple[Path, bytes]:
        """(directory, manifest sha256) of a published version."""
        return version_dir(self.checkpoints, number), bytes.fromhex(self.node.ledger.version(number).manifest_sha256)

    def register(self, path: Path, domain: str = "math", template: str | None = "{question}\n{answer}") -> str:
        """Register a local dataset as the operator would (preload, under the validator's own key): the
        domain is then scored here, from a round opened after it (the open one if it had nothing to score)."""
        operator = identity.key_id(identity.public_bytes(self.node.key))
        dataset_id = self.node.registry.register_file(path, domain, "", operator, template=template).dataset_id
        self.node.book.reopen_if_stale(self.node.book.current())
        return dataset_id

    def next_round(self) -> None:
        """Close the open round with nothing accepted; the next opens on the same version."""
        book, row = self.node.book, self.node.book.current()
        with self.node.ledger.transaction() as db:
            self.node.ledger.move_round(db, row.round, "open", "scoring", closed_ms=now_ms())
        book.finish_empty(self.node.ledger.round(row.round))

    def publish_copy(self) -> int:
        """Publish the shipped model again as the next version (same weights, its own manifest)."""
        latest = self.node.ledger.latest_version()
        moe, tokenizer = load_model(version_dir(self.checkpoints, latest.version))
        v = latest.version + 1
        directory = write_checkpoint(moe.model, tokenizer, self.checkpoints, v,
                                     {"parent": latest.version, "round": None, "accepted": [], "leaderboard": []})
        with self.node.ledger.transaction() as db:
            self.node.ledger.add_version(db, VersionRow(version=v, parent=latest.version, round=None, dir=directory.name,
                                                        manifest_sha256=manifest_sha256(directory), published_ms=now_ms()))
        return v

    def deltas(self, round_number: int) -> list[tuple[SubmissionRow, dict[str, torch.Tensor]]]:
        """The round's stored submissions in arrival order, decoded against the validator's model."""
        shapes = self.node.runtime.moe.expert_shapes()
        return [(row, decode_delta(self.node.spool.read(row.path), shapes).tensors)
                for row in self.node.ledger.submissions(round_number)]

    def listed(self, number: int) -> dict[str, tuple[str, int]]:
        return mf.read(self.version(number)[0]).files
