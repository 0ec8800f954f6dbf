"""Drives the round state machine one small step at a time; the daemon calls `step()` in a loop.

A step is one transition or one scored submission, so a SIGTERM (checked between steps) waits at
most one evaluation or one publish. After kill -9 the ledger's current round and its verdicts say
exactly what is left: unscored submissions are scored (scored ones never again), and a round in
MERGING is merged and published again from the same inputs.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from expertmesh.validator.config import ValidatorConfig
from expertmesh.validator.evalset import build_rows, owned_experts
from expertmesh.validator.judging import RoundEval, claim_order, comparable, judge
from expertmesh.validator.ledger import Ledger, RoundRow
from expertmesh.validator.metrics import Metrics
from expertmesh.validator.publish import prune
from expertmesh.validator.registry import Registry
from expertmesh.validator.release import publish_round
from expertmesh.validator.rounds import RoundBook, now_ms
from expertmesh.validator.runtime import ModelRuntime
from expertmesh.validator.scoring import base_losses
from expertmesh.validator.spool import Spool

log = logging.getLogger(__name__)


class PhaseHooks:
    """Test hook: EXPERTMESH_VALIDATOR_PAUSE="scoring=30,publish=kill" at those named points sleeps
    (seconds), or SIGKILLs this process (`kill`, or `kill:N` at the point's N-th passage).

    Points, in a round's order: `received` (a payload is in, its sha256 checked, not yet spooled),
    `spooled` (in the spool, its ledger row not yet written), `scoring` (after a verdict is
    committed), `merging` (every submission judged, merge not started), `publish` (checkpoint
    written, not yet renamed into place), `commit` (renamed, ledger not yet updated), `announcing`
    (published, not yet announced). Each pause or kill is announced on stderr first, so a crash
    test can also SIGKILL the daemon exactly there itself.
    """

    ENV = "EXPERTMESH_VALIDATOR_PAUSE"
    POINTS = ("received", "spooled", "scoring", "merging", "publish", "commit", "announcing")

    def __init__(self, spec: str = ""):
        self.pauses: dict[str, float] = {}
        self.kills: dict[str, int] = {}
        self._seen: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, _, action = item.partition("=")
            if name not in self.POINTS:
                raise ValueError(f"{self.ENV}: unknown point {name!r} (points: {', '.join(self.POINTS)})")
            if action.startswith("kill"):
                self.kills[name] = int(action.partition(":")[2] or 1)
            else:
                self.pauses[name] = float(action or 3600)

    @classmethod
    def from_env(cls) -> "PhaseHooks":
        return cls(os.environ.get(cls.ENV, ""))

    def __call__(self, phase: str) -> None:
        self._seen[phase] = n = self._seen.get(phase, 0) + 1
        if self.kills.get(phase) == n:
            print(f"expertmesh-validator: kill at {phase}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if phase in self.pauses:
            print(f"expertmesh-validator: pause at {phase}", file=sys.stderr, flush=True)
            time.sleep(self.pauses[phase])


@dataclass
class Scheduler:
    cfg: ValidatorConfig
    ledger: Ledger
    book: RoundBook
    runtime: ModelRuntime
    registry: Registry
    spool: Spool
    metrics: Metrics
    hooks: PhaseHooks = field(default_factory=PhaseHooks)
    on_change: Callable[[], None] = lambda: None
    _eval: dict[int, RoundEval] = field(default_factory=dict)

    def step(self) -> bool:
        """Do one unit of work; False when there was nothing to do (the caller sleeps a little)."""
        row = self.book.current()
        if row.state == "open":
            after = self.book.reopen_if_stale(row)
            if after.round != row.round:
                log.info("round had no submission yet; the next one also scores the datasets registered since",
                         extra={"round": after.round, "domains": sorted(json.loads(after.eval_spec))})
                self.on_change()
                return True
            after = self.book.tick(row)
            if after.state != row.state:
                log.info("round closed", extra={"round": row.round, "submissions": len(self.ledger.submissions(row.round))})
                self.on_change()
            return after.state != row.state
        assert self.runtime.version == row.base_version, (self.runtime.version, row)
        if row.state == "scoring":
            self._score_next(row)
        else:
            self._publish(row)
        return True

    def round_eval(self, row: RoundRow) -> RoundEval:
        """The round's rows and base losses, built once per round (only the current round is kept)."""
        if row.round not in self._eval:
            spec = json.loads(row.eval_spec or "{}")
            rows = build_rows(self.runtime.tokenizer, self.registry, spec, self.cfg.scoring)
            owned = owned_experts(self.runtime.moe, self.runtime.tokenizer, self.registry, spec, self.cfg.scoring)
            self._eval = {row.round: RoundEval(rows, base_losses(self.runtime.moe, rows), owned)}
        return self._eval[row.round]

    def _score_next(self, row: RoundRow) -> None:
        subs = sorted(self.ledger.submissions(row.round), key=claim_order)
        verdicts = self.ledger.verdicts(row.round)
        pending = [s for s in subs if s.digest not in verdicts]
        if not pending:
            if any(v.verdict == "accepted" for v in verdicts.values()):
                self.book.to_merging(row)
            else:
                self.book.finish_empty(row)
                self.spool.drop_round(row.round)
                self.metrics.rounds.labels(outcome="empty").inc()
                log.info("round finished with nothing accepted; reopening on the same version",
                         extra={"round": row.round, "version": row.base_version})
                self.on_change()
            return
        sub = pending[0]
        earlier = comparable(subs[:subs.index(sub)], verdicts)
        ev = self.round_eval(row)
        verdict = judge(sub, earlier, self.runtime, self.spool, row.base_version, ev, self.cfg.scoring)
        self.ledger.add_verdict(verdict)
        self.metrics.judged(verdict)
        log.info("scored submission", extra={"round": row.round, "submission": sub.digest[:16], "miner": sub.miner[:16],
                                             "domain": sub.domain, "verdict": verdict.verdict, "code": verdict.code,
                                             "reason": verdict.reason,
                                             "score": verdict.score, "base_loss": verdict.base_loss,
                                             "new_loss": verdict.new_loss, "seconds": round(verdict.seconds, 3)})
        self.hooks("scoring")

    def _publish(self, row: RoundRow) -> None:
        self.hooks("merging")
        verdicts = self.ledger.verdicts(row.round)
        accepted = [(s, verdicts[s.digest]) for s in self.ledger.submissions(row.round)
                    if verdicts[s.digest].verdict == "accepted"]
        t0 = time.perf_counter()
        try:
            release = publish_round(self.runtime, self.ledger, self.spool, self.cfg.state_dir, row, accepted,
                                    self.cfg.merge, now_ms(), self.round_eval(row),
                                    before_rename=lambda: self.hooks("publish"))
            self.hooks("commit")
            self.book.finish_published(row, release.version, release.momentum)
        except BaseException:
            self.runtime.load(self.ledger.version(row.base_version))  # the merge was written into the live model
            raise
        self.runtime.version, self.runtime.manifest_sha256 = release.version.version, release.version.manifest_sha256
        self.runtime.refresh()
        self.metrics.published(release.version.version, time.perf_counter() - t0)
        log.info("published version", extra={"round": row.round, "version": release.version.version,
                                             "accepted": len(accepted), "dir": str(release.directory)})
        self.spool.drop_round(row.round)
        self._cleanup()
        self.hooks("announcing")
        self.on_change()

    def _cleanup(self) -> None:
        """Keep the last K versions and only the momentum files the ledger refers to."""
        live = [v for v in self.ledger.versions() if not v.pruned]
        keep = {v.version for v in live[-self.cfg.publish.keep_versions:]}
        for v in prune(self.runtime.checkpoints, keep):
            self.ledger.mark_pruned(v)
        referenced = {Path(p).parent.name for p, _ in self.ledger.momentum_refs().values()}
        for folder in (self.cfg.state_dir / "momentum").glob("r*"):
            if folder.name not in referenced:
                shutil.rmtree(folder, ignore_errors=True)
