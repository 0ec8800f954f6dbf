"""Taking uploads into the validator: deltas into the current round, datasets into the registry.

By the time these run, the transport has verified the envelope (signature, key, timestamp, nonce,
size) and, for `accept_*`, streamed the payload to disk with its sha256 checked. Here: the header
against the round (open? this round? this model version and manifest? a domain scored here?), then
only the delta's safetensors header is read (bounded, whatever the payload's size), the file moves
into the spool and its ledger row is written. A known digest, or the same payload from the same key
in the same round, gets the first receipt again: one signed submission is one submission.
"""
from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

from expertmesh.protocol.admission import KeyPolicy
from expertmesh.protocol.codec import read_delta_header
from expertmesh.protocol.commit import commitment, work_bits
from expertmesh.protocol.delta_format import MAX_HEADER_BYTES
from expertmesh.protocol.errors import DeltaFormatError, Rejected
from expertmesh.protocol.identity import key_id
from expertmesh.protocol.types import DatasetReceipt, Receipt, Submission
from expertmesh.validator.config import ValidatorConfig
from expertmesh.validator.ledger import DatasetRow, Ledger, SubmissionRow
from expertmesh.validator.metrics import Metrics
from expertmesh.validator.registry import DatasetError, Registry
from expertmesh.validator.rounds import IntakeRefused, RoundBook, now_ms
from expertmesh.validator.spool import Spool

log = logging.getLogger(__name__)


def read_header_prefix(path: Path):
    """The delta header from the file's first bytes only: memory stays bounded for any payload size."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        prefix = head + f.read(min(n, MAX_HEADER_BYTES))
    return read_delta_header(prefix, max_bytes=8 + MAX_HEADER_BYTES)


class Intake:
    def __init__(self, ledger: Ledger, book: RoundBook, spool: Spool, registry: Registry, cfg: ValidatorConfig,
                 metrics: Metrics, policy: KeyPolicy | None = None, hooks: Callable[[str], None] = lambda _: None):
        self.ledger, self.book, self.spool, self.registry = ledger, book, spool, registry
        self.cfg, self.metrics, self.policy, self.hooks = cfg, metrics, policy or KeyPolicy(), hooks

    def scored_domains(self) -> list[str]:
        """Domains a submission may name: those the current round was frozen with (validator/evalset.py)."""
        return sorted(json.loads(self.book.current().eval_spec or "{}"))

    def _refuse(self, status: str, message: str) -> Rejected:
        self.metrics.refused.labels(status=status).inc()
        return Rejected(status, message)

    def _receipt(self, row: SubmissionRow) -> Receipt:
        """The one receipt of a stored submission: a retry gets exactly what the first upload got."""
        return Receipt(submission_id=bytes.fromhex(row.digest), round=row.round, payload_bytes=row.payload_bytes,
                       message=f"queued for scoring in round {row.round}")

    # --- deltas --------------------------------------------------------------------------------
    def _open_round_for(self, env) -> None:
        """The envelope names the open round, its model version and a domain scored in it."""
        cur = self.book.current()
        if cur.state != "open" or env.round != cur.round:
            raise self._refuse("FAILED_PRECONDITION", f"round {env.round} is not open here (current round {cur.round} "
                               f"is {cur.state}); ask GetRound and submit to the open round")
        base = self.ledger.version(cur.base_version)
        if env.model_version != base.version or env.model_sha256.hex() != base.manifest_sha256:
            raise self._refuse("FAILED_PRECONDITION", f"delta is for model version {env.model_version}; round "
                               f"{cur.round} trains version {base.version} (manifest {base.manifest_sha256[:16]}…); "
                               "fetch it and train again")
        domains = self.scored_domains()
        if env.domain not in domains:
            raise self._refuse("FAILED_PRECONDITION", f"domain {env.domain!r} is not scored in round {cur.round} "
                               f"(scored: {domains}); new domains need the operator's scoring.domains, and datasets "
                               "registered during a round are scored from the next one")

    def trusted(self, public_key: bytes) -> bool:
        """Commits without proof of work: on the allow list, or with `trusted_after` accepted deltas."""
        return self.policy.listed(public_key) or \
            self.ledger.accepted_count(key_id(public_key)) >= self.cfg.admission.trusted_after

    # --- commitments ---------------------------------------------------------------------------
    def commit_delta(self, sub: Submission) -> Receipt:
        env, adm = sub.envelope, self.cfg.admission
        self._open_round_for(env)
        if adm.pow_bits and not self.trusted(env.public_key):
            bits = work_bits(env.public_key, env.payload_sha256, env.label)
            if bits < adm.pow_bits:
                raise self._refuse("PERMISSION_DENIED", f"the commitment carries {bits} bits of proof of work; this "
                                   f"validator asks {adm.pow_bits} of keys without accepted work (GetRound's pow_bits;"
                                   " protocol.commit.solve)")
        got = self.ledger.add_commit(env.round, key_id(env.public_key), env.payload_sha256.hex(), sub.digest.hex(),
                                     now_ms(), adm.max_commits)
        if got is None:
            raise self._refuse("RESOURCE_EXHAUSTED", f"this key already holds {adm.max_commits} commitments in round "
                               f"{env.round}; submit one of them or wait for the next round")
        seq, digest = got
        return Receipt(submission_id=bytes.fromhex(digest), round=env.round, payload_bytes=env.payload_size,
                       message=f"commitment {seq} of round {env.round} recorded; now upload the payload")

    # --- deltas --------------------------------------------------------------------------------
    def admit_delta(self, sub: Submission) -> Receipt | None:
        env = sub.envelope
        known = self.ledger.submission(sub.digest.hex())
        if known is not None:
            return self._receipt(known)
        self._open_round_for(env)
        earlier = self.ledger.same_payload(env.round, key_id(env.public_key), env.payload_sha256.hex())
        if earlier is not None:
            return self._receipt(earlier)
        if self._commit_seq(env) is None:
            raise self._refuse("FAILED_PRECONDITION", f"this key made no commitment to this payload in round "
                               f"{env.round}; send CommitDelta first, then the payload (commit, then reveal: "
                               "docs/protocol.md)")
        try:
            self.book.check_room(env.round, key_id(env.public_key))  # before a byte of the payload is written
        except IntakeRefused as exc:
            raise self._refuse(exc.status, str(exc)) from None
        return None

    def _commit_seq(self, env) -> int | None:
        return self.ledger.commit_seq(env.round, key_id(env.public_key),
                                      commitment(env.public_key, env.payload_sha256).hex())

    def accept_delta(self, sub: Submission, payload: Path) -> Receipt:
        env = sub.envelope
        self.hooks("received")
        try:
            header = read_header_prefix(payload)
        except DeltaFormatError as exc:
            raise self._refuse("INVALID_ARGUMENT", str(exc)) from None
        if header.model_version != env.model_version:
            raise self._refuse("INVALID_ARGUMENT", f"the delta's header says version {header.model_version}, its "
                               f"envelope {env.model_version}; encode and sign the same version")
        digest = sub.digest.hex()
        rel = self.spool.store(payload, env.round, digest)
        self.hooks("spooled")
        row = SubmissionRow(seq=None, digest=digest, round=env.round, miner=key_id(env.public_key), domain=env.domain,
                            model_version=env.model_version, payload_sha256=env.payload_sha256.hex(),
                            payload_bytes=env.payload_size, path=rel, codec=header.codec,
                            token_count=header.token_count, experts=header.experts,
                            received_ms=now_ms(), commit_seq=self._commit_seq(env))
        try:
            self.book.record(row)
        except IntakeRefused as exc:
            self.spool.path(rel).unlink(missing_ok=True)
            raise self._refuse(exc.status, str(exc)) from None
        except sqlite3.IntegrityError:  # the same payload raced in on another stream under another envelope
            self.spool.path(rel).unlink(missing_ok=True)
            return self._receipt(self.ledger.submission(digest)
                                 or self.ledger.same_payload(env.round, row.miner, row.payload_sha256))
        except BaseException:  # no spooled file outlives a failed insert (a crash here is swept at start-up)
            self.spool.path(rel).unlink(missing_ok=True)
            raise
        self.metrics.received.inc()
        log.info("submission received", extra={"round": env.round, "submission": digest[:16], "miner": row.miner[:16],
                                               "domain": env.domain, "bytes": env.payload_size, "codec": header.codec})
        return self._receipt(row)

    # --- datasets ------------------------------------------------------------------------------
    def _dataset_receipt(self, digest: bytes, row: DatasetRow) -> DatasetReceipt:
        return DatasetReceipt(submission_id=digest, dataset_id=row.dataset_id,
                              message=f"{row.records} records ({row.duplicates} duplicates dropped): "
                                      f"train {row.train_records}, held-out {row.heldout_records}")

    def admit_dataset(self, sub: Submission) -> DatasetReceipt | None:
        known = self.ledger.dataset_of_upload(sub.digest.hex())
        if known is not None:
            return self._dataset_receipt(sub.digest, known)
        if self.cfg.scoring.domains and sub.envelope.domain not in self.cfg.scoring.domains:
            raise self._refuse("FAILED_PRECONDITION", f"domain {sub.envelope.domain!r} is not evaluated here "
                               f"(domains: {list(self.cfg.scoring.domains)})")
        return None

    def accept_dataset(self, sub: Submission, payload: Path) -> DatasetReceipt:
        env = sub.envelope
        try:
            row = self.registry.register(payload, env.domain, env.label, key_id(env.public_key))
        except DatasetError as exc:
            raise self._refuse("INVALID_ARGUMENT", str(exc)) from None
        self.ledger.add_dataset_upload(sub.digest.hex(), row.dataset_id, now_ms())
        cur = self.book.current()
        if cur.state == "open":  # a round with no submission yet gives way to one that scores this too
            self.book.reopen_if_stale(cur)
        self.metrics.datasets.inc()
        log.info("dataset registered", extra={"dataset": row.dataset_id, "domain": row.domain,
                                              "records": row.records, "heldout": row.heldout_records})
        return self._dataset_receipt(sub.digest, row)
