"""From a trained delta to a receipt, exactly once per round, across crashes.

prepare: encode the delta with last round's error-feedback residual, sign the envelope, and write
payload, envelope and the *next* residual into the round's work directory (nothing is sent yet).
send: commit to the payload (protocol.commit: its hash and the round's proof of work), then stream that
same payload and envelope; a retry after a lost connection or a restart sends the
identical signed submission, which the validator answers with its first receipt (idempotent). On a
receipt the residual is promoted and the round recorded in the submission book, which is checked
before any work on a round: the miner never submits twice for one round.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from expertmesh.protocol.files import atomic_write
from expertmesh.node.miner.locate import CannotTakePart
from expertmesh.protocol.client import ValidatorClient, sign_commit, sign_upload
from expertmesh.protocol.codec import CodecConfig, DeltaMeta, encode_delta
from expertmesh.protocol.errors import RemoteError
from expertmesh.protocol.types import Receipt, RoundInfo, SignedEnvelope

# Refusals that are final for this round: record them and wait for the next one.
FINAL_CODES = {"FAILED_PRECONDITION", "INVALID_ARGUMENT", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"}


class SubmissionBook:
    """state_dir/submissions.json: {"<round>": {"outcome", "submission_id", "version", ...}}."""

    def __init__(self, path: Path):
        self.path = path
        self._doc = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, round_number: int) -> dict | None:
        return self._doc.get(str(round_number))

    def record(self, round_number: int, entry: dict) -> None:
        self._doc[str(round_number)] = entry | {"time_ms": int(time.time() * 1000)}
        atomic_write(self.path, json.dumps(self._doc, indent=1, sort_keys=True).encode())


@dataclass(frozen=True)
class Prepared:
    work_dir: Path
    round: int
    model_version: int
    payload: Path
    envelope: SignedEnvelope


class Outbox:
    def __init__(self, key, codec: CodecConfig, residual_path: Path, domain: str):
        self.key, self.domain, self.residual_path = key, domain, residual_path
        self.codec = codec

    def _residual(self) -> dict[str, torch.Tensor]:
        return load_file(self.residual_path) if self.residual_path.is_file() else {}

    def prepare(self, work_dir: Path, delta: dict[str, torch.Tensor], rnd: RoundInfo, tokens: int,
                data_digest: str) -> Prepared:
        enc = encode_delta(delta, DeltaMeta(rnd.model_version, tokens, data_digest), self.codec, self._residual())
        atomic_write(work_dir / "delta.safetensors", enc.payload)
        # Always written, even empty: a codec without rounding (fp32) consumes the old residual too.
        save_file({k: v.contiguous() for k, v in enc.residual.items()}, work_dir / "residual.next.safetensors")
        return self._sign(work_dir, rnd.round, rnd.model_version, rnd.model_sha256)

    def _sign(self, work_dir: Path, round_number: int, version: int, model_sha256: bytes) -> Prepared:
        payload = work_dir / "delta.safetensors"
        env = sign_upload("delta", self.key, payload, model_version=version, model_sha256=model_sha256,
                          round=round_number, domain=self.domain)
        doc = {"round": round_number, "model_version": version, "model_sha256": model_sha256.hex(),
               "body": env.body.hex(), "signature": env.signature.hex()}
        atomic_write(work_dir / "envelope.json", json.dumps(doc).encode())
        return Prepared(work_dir, round_number, version, payload, env)

    def _commit(self, client: ValidatorClient, prepared: Prepared, model_sha256: bytes, pow_bits: int) -> None:
        env = sign_commit(self.key, prepared.payload, model_version=prepared.model_version, model_sha256=model_sha256,
                          round=prepared.round, domain=self.domain, pow_bits=pow_bits)
        try:
            client.commit_delta(env)
        except RemoteError as exc:
            if exc.code != "UNIMPLEMENTED":  # a validator without commit-then-reveal takes the payload alone
                raise

    def load(self, work_dir: Path) -> Prepared | None:
        """A submission prepared before a restart (payload and envelope on disk), or None."""
        path = work_dir / "envelope.json"
        if not path.is_file() or not (work_dir / "delta.safetensors").is_file():
            return None
        doc = json.loads(path.read_text())
        env = SignedEnvelope(bytes.fromhex(doc["body"]), bytes.fromhex(doc["signature"]))
        return Prepared(work_dir, doc["round"], doc["model_version"], work_dir / "delta.safetensors", env)

    def send(self, client: ValidatorClient, prepared: Prepared, model_sha256: bytes, pow_bits: int = 0,
             resigned: bool = False) -> Receipt:
        """Commit, then submit; CannotTakePart(reason="refused") for a final refusal, RemoteError for a retryable one.

        The commitment (protocol.commit) carries the round's proof of work; committing again is idempotent."""
        try:
            self._commit(client, prepared, model_sha256, pow_bits)
            receipt = client.submit_delta(prepared.payload, prepared.envelope)
        except RemoteError as exc:
            # Signed too long ago (we were down): same payload, fresh envelope, once. Refused again, the
            # clocks disagree; that is retried with backoff and the validator's message says so.
            if exc.code == "OUT_OF_RANGE" and not resigned:
                prepared = self._sign(prepared.work_dir, prepared.round, prepared.model_version, model_sha256)
                return self.send(client, prepared, model_sha256, pow_bits, resigned=True)
            if exc.code in FINAL_CODES:
                raise CannotTakePart("refused", f"round {prepared.round}: the validator refused the submission: "
                                     f"{exc.code}: {exc.details}") from None
            raise
        nxt = prepared.work_dir / "residual.next.safetensors"
        if nxt.is_file():
            nxt.replace(self.residual_path)
        return receipt
