"""A real validator process to attack over the wire, and what an attacker needs to attack it.

`Arena` runs `expertmesh validator run` (tests/validator/valhelpers.Daemon) with the project's
default rules, on the shipped model, with math (GSM8K) and literature (Tiny Shakespeare) preloaded
by the operator, and a fast evaluation (2,048 held-out tokens per domain) so each submission scores
in about a second. Attackers use only what any peer has: the public corpora, the shipped model, the
signed upload RPCs.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "validator"))

from valhelpers import Daemon, config_doc, encode, ledger_rows, submit, wait_until, write_config  # noqa: E402

from expertmesh.protocol import identity  # noqa: E402
from expertmesh.protocol.client import ClientConfig, ValidatorClient, sign_upload  # noqa: E402

MAX_U63 = 2**63 - 1


def fresh_key():
    return identity.generate_key()


@dataclass
class Arena:
    daemon: Daemon
    client: ValidatorClient
    state: Path

    def submit(self, key, delta: dict, domain: str = "math", tokens: int = 20_480) -> str:
        """Encode (int8), commit, sign for the open round and upload; the submission's digest."""
        info = self.client.get_round()
        return submit(self.client, key, encode(delta, info.model_version, tokens=tokens), domain)[0].submission_id.hex()

    def register(self, key, path: Path, domain: str, name: str = "upload") -> str:
        info = self.client.get_round()
        env = sign_upload("dataset", key, path, model_version=info.model_version, model_sha256=info.model_sha256,
                          round=info.round, domain=domain, label=name)
        return self.client.register_dataset(path, env).dataset_id

    def verdicts(self, digests: list[str], timeout_s: float = 300) -> dict[str, dict]:
        """The verdict rows of these submissions, once all are scored."""
        def ready():
            rows = {r["digest"]: r for r in ledger_rows(self.state, "SELECT * FROM verdicts")}
            return rows if all(d in rows for d in digests) else None
        rows = wait_until(ready, timeout_s, f"verdicts of {len(digests)} submission(s)", self.daemon)
        return {d: rows[d] for d in digests}

    def manifest(self, version: int, timeout_s: float = 300) -> dict:
        wait_until(lambda: self.client.get_round().model_version >= version, timeout_s, f"version {version}",
                   self.daemon)
        return json.loads((self.state / "checkpoints" / f"v{version}" / "manifest.json").read_text())

    def round_spec(self, number: int) -> dict:
        (row,) = ledger_rows(self.state, "SELECT eval_spec FROM rounds WHERE round=?", (number,))
        return json.loads(row["eval_spec"])


def start(tmp_path: Path, corpora: dict[str, Path], **sections) -> Arena:
    """A validator with the defaults, the given corpora preloaded by its operator, and `sections` on top."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    state = tmp_path / "state"
    doc = config_doc(state, **sections)
    doc["scoring"] = {k: v for k, v in doc["scoring"].items() if k != "open_domains"}  # the default: closed
    doc["scoring"].update(sections.get("scoring", {}))
    doc["datasets"] = {**doc.get("datasets", {}),
                       "preload": [{"domain": d, "path": str(p), "name": d} for d, p in corpora.items()]}
    daemon = Daemon(write_config(tmp_path / "validator.toml", doc), tmp_path / "validator.log")
    client = ValidatorClient(daemon.address, ClientConfig(call_timeout_s=30, upload_timeout_s=60))
    return Arena(daemon, client, state)


def stop(arena: Arena) -> None:
    arena.client.close()
    arena.daemon.cleanup()


def raw_call(address: str, method: str, frames, timeout_s: float = 60.0):
    """A hand-made upload on its own channel, bypassing ValidatorClient: (future, channel); close the channel."""
    import grpc

    from expertmesh.protocol import expertmesh_pb2_grpc as pbg

    channel = grpc.insecure_channel(address)
    return getattr(pbg.ValidatorStub(channel), method).future(frames, timeout=timeout_s), channel


def held_open(*frames, release, hold_s: float = 60.0):
    """The given upload frames, then nothing until `release` is set: a peer that stalls."""
    yield from frames
    release.wait(hold_s)
