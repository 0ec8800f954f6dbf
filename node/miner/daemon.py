"""The miner daemon: find the validator, fetch the round's model, train the domain's experts, submit; repeat.

Composed from small parts: Locator (where the validator is), CheckpointCache (verified model
versions), DataSource (domain data), plan (rows + ESFT selection, cached), run_inner (resumable
inner loop), Outbox + SubmissionBook (encode, sign, send once per round). This module only
sequences them and decides what to say and how long to wait. Whatever the network does, the daemon
keeps going: a reason it cannot take part is printed as one line and retried with backoff; only
a configuration error (bad key, unreadable local data) ends it, with exit code 2 from the CLI.
"""
from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

import torch

from expertmesh.node.fetch import CheckpointCache
from expertmesh.node.locks import hold_state_dir
from expertmesh.node.miner.config import MinerConfig
from expertmesh.node.miner.data import DataSource, check_local
from expertmesh.node.miner.inner import run_inner
from expertmesh.node.miner.locate import CannotTakePart, Locator
from expertmesh.node.miner.metrics import MinerMetrics
from expertmesh.node.miner.plan import make_plan
from expertmesh.node.miner.progress import Progress
from expertmesh.node.miner.submit import Outbox, SubmissionBook
from expertmesh.node.moe import ModelError, load_model
from expertmesh.node.train import Stopped
from expertmesh.protocol import identity
from expertmesh.protocol.client import ClientConfig, ValidatorClient
from expertmesh.protocol.errors import ProtocolError, RemoteError
from expertmesh.protocol.manifest import ManifestError
from expertmesh.protocol.types import RoundInfo, RoundPhase


class Backoff:
    def __init__(self, low: float, high: float):
        self.low, self.high, self.current = low, high, low

    def next(self) -> float:
        wait, self.current = self.current, min(self.high, self.current * 2)
        return wait

    def reset(self) -> None:
        self.current = self.low


class Miner:
    def __init__(self, cfg: MinerConfig, stop: threading.Event, progress: Progress, metrics: MinerMetrics):
        self.cfg, self.stop, self.progress, self.metrics = cfg, stop, progress, metrics
        state = cfg.state_dir
        state.mkdir(parents=True, exist_ok=True)
        self.key = identity.load_key(cfg.key)
        check_local(cfg.data)
        self.locator = Locator(cfg.validator, cfg.domain)
        self.models = CheckpointCache(state / "models", cfg.validator.max_checkpoint_bytes)
        self.data = DataSource(cfg.data, cfg.domain, state / "datasets", cfg.validator.max_dataset_bytes)
        self.book = SubmissionBook(state / "submissions.json")
        self.outbox = Outbox(self.key, cfg.codec, state / "residual.safetensors", cfg.domain)
        self.client_cfg = ClientConfig(call_timeout_s=cfg.validator.call_timeout_s,
                                       max_download_bytes=max(cfg.validator.max_checkpoint_bytes,
                                                              cfg.validator.max_dataset_bytes))
        self._said = ""
        want = cfg.train.device
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want)

    def say(self, text: str, repeat: bool = False) -> None:
        """One line per change of situation: a miner polling for the next round does not repeat itself,
        a retry after a failure (`repeat`) always says why, at most once per backoff period."""
        if repeat or text != self._said:
            self.progress.line(text)
            self._said = text

    def run(self) -> int:
        backoff = Backoff(self.cfg.loop.backoff_min_s, self.cfg.loop.backoff_max_s)
        self.say(f"key {identity.key_id(identity.public_bytes(self.key))[:16]}…, domain {self.cfg.domain}, "
                 f"state {self.cfg.state_dir}")
        submitted = 0
        try:
            while not self.stop.is_set():
                try:
                    if self.cycle():
                        backoff.reset()
                        submitted += 1
                        if submitted == self.cfg.loop.max_rounds:
                            self.say(f"submitted {submitted} round(s), loop.max_rounds reached; exiting")
                            return 0
                    else:
                        self.stop.wait(self.cfg.loop.poll_s)
                except CannotTakePart as exc:
                    self.locator.forget()
                    self.metrics.not_taking_part.labels(reason=exc.reason).inc()
                    wait = backoff.next()
                    self.say(f"cannot take part: {exc}; retrying in {wait:.0f}s", repeat=True)
                    self.stop.wait(wait)
                except InterruptedError:
                    raise
                except (RemoteError, ProtocolError, ManifestError, ModelError, OSError) as exc:
                    # RemoteError is a ConnectionError (an OSError): the validator is down or refused a call.
                    self.locator.forget()
                    self.metrics.not_taking_part.labels(reason=type(exc).__name__).inc()
                    wait = backoff.next()
                    self.say(f"cannot take part: {exc}; retrying in {wait:.0f}s", repeat=True)
                    self.stop.wait(wait)
        except (Stopped, InterruptedError) as exc:
            self.say(str(exc))
        finally:
            self.locator.close()
        self.say("stopped")
        return 0

    def cycle(self) -> bool:
        """One look at the validator; True when a submission for a new round was received."""
        address = self.locator.find()
        with ValidatorClient(address, self.client_cfg) as client:
            rnd = client.get_round()
            self.metrics.round.set(rnd.round)
            done = self.book.get(rnd.round)
            if done is not None:
                self.say(f"round {rnd.round}: {done['outcome']}; waiting for the next round")
                return False
            if rnd.phase != RoundPhase.OPEN:
                self.say(f"round {rnd.round} is closed (scoring or publishing); waiting")
                return False
            if self.cfg.domain not in rnd.domains:
                raise CannotTakePart("domain", f"the validator at {address} does not score domain "
                                     f"{self.cfg.domain!r} this round (it scores {list(rnd.domains)}; its operator enables domains)")
            work = self.cfg.state_dir / "work" / f"r{rnd.round}-v{rnd.model_version}"
            work.mkdir(parents=True, exist_ok=True)
            self._clean_work(keep=work)
            prepared = self.outbox.load(work)
            if prepared is None:
                prepared = self._train(client, rnd, work)
            work_note = f" (commitment with {rnd.pow_bits} bits of proof of work)" if rnd.pow_bits else ""
            self.say(f"round {rnd.round}: submitting {prepared.payload.stat().st_size:,} bytes to {address}{work_note}")
            try:
                receipt = self.outbox.send(client, prepared, rnd.model_sha256, rnd.pow_bits)
            except CannotTakePart as exc:
                self.book.record(rnd.round, {"outcome": "refused", "reason": str(exc), "version": rnd.model_version})
                self.metrics.submissions.labels(outcome="refused").inc()
                raise
            self.book.record(rnd.round, {"outcome": "received", "submission_id": receipt.submission_id.hex(),
                                         "version": rnd.model_version, "domain": self.cfg.domain,
                                         "bytes": prepared.payload.stat().st_size, "message": receipt.message})
            self.metrics.submissions.labels(outcome="received").inc()
            self.say(f"round {rnd.round}: received ({receipt.message or receipt.submission_id.hex()[:16]})")
            return True

    def _train(self, client: ValidatorClient, rnd: RoundInfo, work: Path):
        self.metrics.model_version.set(rnd.model_version)
        model_dir = self.models.ensure(client, rnd.model_version, rnd.model_sha256, progress=self.progress.bytes,
                                       stop=self.stop.is_set)
        data = self.data.load(client, rnd.heldout_fraction)
        moe, tokenizer = load_model(model_dir)
        moe.model.to(self.device)
        try:
            plan = make_plan(moe, tokenizer, model_dir, data, self.cfg, self.cfg.state_dir / "cache", self.progress)
        except ValueError as exc:  # DataError, too few tokens
            if self.cfg.data.path is not None:
                raise  # the operator's own file: a configuration error
            raise CannotTakePart("data", f"the validator's train split is unusable: {exc}") from None
        n = len(plan.selection)
        self.metrics.selected_experts.set(n)
        self.say(f"round {rnd.round}: version {rnd.model_version}, {n} experts selected "
                 f"(p={self.cfg.select.p}), {plan.rows_NL.shape[0]} rows of {data.source}; "
                 f"{self.cfg.train.steps} inner steps")
        result = run_inner(moe, plan.selection, plan.rows_NL.to(self.device), self.cfg.train, rnd.round,
                           work / "inner", self.progress, self.metrics, self.stop.is_set)
        prepared = self.outbox.prepare(work, result.delta, rnd, result.tokens, data.digest)
        shutil.rmtree(work / "inner", ignore_errors=True)  # the payload now stands for the inner state
        self.metrics.payload_bytes.set(prepared.payload.stat().st_size)
        return prepared

    def _clean_work(self, keep: Path) -> None:
        for d in keep.parent.iterdir():
            if d != keep and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)


def run_miner(cfg: MinerConfig) -> int:
    """The `expertmesh miner run` entry: signals, threads, metrics around Miner.run."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    progress = Progress("miner", cfg.loop.progress_every_s)
    metrics = MinerMetrics()
    with hold_state_dir(cfg.state_dir, "expertmesh miner run"):  # before anything in it is read or written
        miner = Miner(cfg, stop, progress, metrics)
        try:
            miner.locator.join()  # before any thread starts (see Locator.join); a failure is retried in the loop
        except CannotTakePart as exc:
            progress.line(f"not taking part yet: {exc}")
        if cfg.metrics.enabled:
            port = metrics.serve(cfg.metrics.host, cfg.metrics.port)
            progress.line(f"metrics on http://{cfg.metrics.host}:{port}/metrics")
        try:
            return miner.run()
        finally:
            metrics.stop()
