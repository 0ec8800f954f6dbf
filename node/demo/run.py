"""`expertmesh demo`: a whole network on this machine for N rounds, with a table after each round.

The demo is only an observer once the network runs: it asks the validator for the round (public
RPC), reads each published manifest (accepted submissions and scores) and the miners' own
submission records, and measures every published version on each domain's held-out records.
Ctrl-C, SIGTERM or any failure stops every child it started; logs stay in the run directory.
"""
from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from expertmesh.node.demo.network import (DemoSettings, miner_domains, register_domains,
                                          start_bootstrap, start_miner, start_validator,
                                          write_demo_heldout_key)
from expertmesh.node.demo.procs import DemoError, Supervisor
from expertmesh.protocol.files import atomic_write
from expertmesh.node.locks import hold_state_dir
from expertmesh.node.demo.report import RoundReport, summary, table


@dataclass(frozen=True)
class DemoOptions:
    rounds: int = 3
    miners: int = 3
    json_path: Path | None = None
    run_dir: Path | None = None
    steps: int | None = None
    eval_tokens: int = 16_384
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 1 <= self.rounds <= 100:
            raise ValueError(f"--rounds must be within [1, 100], got {self.rounds}")
        if not 1 <= self.miners <= 12:
            raise ValueError(f"--miners must be within [1, 12], got {self.miners}")
        if self.steps is not None and not 1 <= self.steps <= 100_000:
            raise ValueError(f"--steps must be within [1, 100000], got {self.steps}")
        if not 256 <= self.eval_tokens <= 1 << 24:
            raise ValueError(f"--eval-tokens must be within [256, 16777216], got {self.eval_tokens}")


def say(text: str) -> None:
    print(text, flush=True)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same path as Ctrl-C: stop the children, keep the logs


def run_demo(opts: DemoOptions) -> int:
    run_dir = (opts.run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    with hold_state_dir(run_dir, "expertmesh demo"):  # a second demo on this run directory stops here
        return _run_demo(opts, run_dir)


def _run_demo(opts: DemoOptions, run_dir: Path) -> int:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1)  # many processes share few cores: one thread each avoids oversubscription
    signal.signal(signal.SIGTERM, _interrupt)
    sup = Supervisor(run_dir / "logs", env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                           "TOKENIZERS_PARALLELISM": "false"})
    say(f"demo: {opts.miners} miner(s), {opts.rounds} round(s); run directory {run_dir}")
    code = 1
    try:
        Network(opts, run_dir, sup).run()
        code = 0
    except KeyboardInterrupt:
        say("demo: interrupted; stopping every process it started")
        code = 130
    except DemoError as exc:
        say(f"demo failed: {exc}")
    finally:
        sup.stop_all()
        say(f"demo: logs and state are in {run_dir}")
    return code


class Network:
    def __init__(self, opts: DemoOptions, run_dir: Path, sup: Supervisor):
        self.opts, self.run_dir, self.sup = opts, run_dir, sup
        defaults = DemoSettings()
        # The validator scores on the rows the demo reports: one yardstick for scores and losses.
        self.settings = DemoSettings(steps=opts.steps or defaults.steps, eval_tokens=opts.eval_tokens)
        self.deadline = time.monotonic() + opts.timeout_s
        self.doc: dict = {"run_dir": str(run_dir), "rounds": []}

    def run(self) -> None:
        from expertmesh.node.demo.heldout import HeldOut, domain_sources
        from expertmesh.node.moe import load_model
        from expertmesh.node.paths import DEFAULT_MODEL

        t0 = time.monotonic()
        sources = domain_sources(self.run_dir / "data")
        peers = start_bootstrap(self.sup)
        say(f"demo: DHT bootstrap at {peers[0]}")
        validator, address, state = start_validator(self.sup, self.run_dir, peers, self.opts.miners,
                                                    self.opts.rounds + 2, self.settings, list(sources))
        say(f"demo: validator at {address}")
        register_domains(self.sup, self.run_dir, address, list(sources.values()))
        with self._client(address) as client:
            # The rounds from this one on are the demo's (each registration gave the validator a fresh round).
            start = client.get_round()
        say(f"demo: registered {', '.join(sources)} through `expertmesh dataset submit`")
        self.miners = []
        for i, domain in enumerate(miner_domains(self.opts.miners)):
            child, key_id, miner_state = start_miner(self.sup, self.run_dir, i, domain, peers, self.settings)
            self.miners.append((child.name, domain, key_id, miner_state))
        say(f"demo: started {len(self.miners)} miner(s): {', '.join(m[0] for m in self.miners)}")
        # The yardstick is measured while the miners start up: the base model on fixed held-out rows.
        _, tokenizer = load_model(DEFAULT_MODEL)
        self.heldout = HeldOut(sources, tokenizer, self.opts.eval_tokens, write_demo_heldout_key(self.run_dir))
        base = self.heldout.losses(DEFAULT_MODEL)
        self.doc |= {"base_model": str(DEFAULT_MODEL), "base_domain_loss": base,
                     "miners": {name: {"domain": d, "key": k} for name, d, k, _ in self.miners}}
        say("demo: base held-out loss " + ", ".join(f"{d} {v:.4f}" for d, v in base.items()))
        self._follow(address, state, base, start)
        self.doc["seconds"] = round(time.monotonic() - t0, 1)
        self._write_json()
        say(summary(self.doc))

    @staticmethod
    def _client(address: str):
        from expertmesh.protocol.client import ClientConfig, ValidatorClient

        return ValidatorClient(address, ClientConfig(call_timeout_s=30))

    def _follow(self, address: str, state: Path, base: dict[str, float], start) -> None:
        with self._client(address) as client:
            version, seen_round, started, empty = start.model_version, start.round, time.monotonic(), 0
            while len(self.doc["rounds"]) < self.opts.rounds:
                self.sup.check()
                if time.monotonic() > self.deadline:
                    raise DemoError(f"--timeout {self.opts.timeout_s:.0f}s reached after "
                                    f"{len(self.doc['rounds'])} published round(s)")
                rnd = client.get_round()
                if rnd.model_version > version:
                    # Every version in turn: a busy machine can publish one while the demo is still
                    # measuring the base or the previous version.
                    version += 1
                    sha = rnd.model_sha256 if version == rnd.model_version else self._manifest_sha(client, version)
                    ckpt = self._checkpoint(client, state, version, sha)
                    report = RoundReport.build(ckpt, rnd, self.miners, self.heldout.losses(ckpt),
                                               time.monotonic() - started)
                    say(table(report, base))
                    self.doc["rounds"].append(report.to_json())
                    self._write_json()
                    started, seen_round = time.monotonic(), rnd.round
                    continue
                if rnd.round > seen_round:
                    empty += 1
                    say(f"demo: round {seen_round} ended with nothing accepted; the validator reopened on "
                        f"version {version} (see {self.run_dir / 'logs' / 'validator.log'})")
                    if empty > self.opts.rounds:
                        raise DemoError("rounds keep ending with nothing accepted; see the validator's log")
                seen_round = rnd.round
                time.sleep(1.0)

    def _manifest_sha(self, client, version: int) -> bytes:
        """The sha256 the validator gives for an earlier version's manifest (GetRound names only the latest)."""
        tmp = self.run_dir / "checkpoints" / f".manifest-v{version}.json"
        try:
            return client.fetch_manifest(tmp, version=version).sha256
        finally:
            tmp.unlink(missing_ok=True)

    def _checkpoint(self, client, state: Path, version: int, manifest_sha256: bytes) -> Path:
        """The validator's published directory of `version`; a verified download if it is not readable here."""
        import hashlib

        published = state / "checkpoints" / f"v{version}"
        manifest = published / "manifest.json"
        if manifest.is_file() and hashlib.sha256(manifest.read_bytes()).digest() == manifest_sha256:
            return published
        from expertmesh.node.fetch import CheckpointCache

        return CheckpointCache(self.run_dir / "checkpoints", keep=1000).ensure(client, version, manifest_sha256)

    def _write_json(self) -> None:
        if self.opts.json_path is not None:
            atomic_write(self.opts.json_path, json.dumps(self.doc, indent=1) + "\n")
