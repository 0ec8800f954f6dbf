"""Prometheus metrics of one validator, in its own registry (no process-global collectors).

Served over HTTP only when the config enables it, on a configurable host and port (0: any free
port, logged at start).
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from expertmesh.node.metrics import MetricsEndpoint
from expertmesh.validator.ledger import VerdictRow

_SCORE_BUCKETS = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)
_SECONDS_BUCKETS = (0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000)


class Metrics(MetricsEndpoint):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        p = "expertmesh_validator_"
        self.rounds = Counter(p + "rounds", "rounds finished, by outcome (published or empty)", ["outcome"], registry=r)
        self.received = Counter(p + "received", "submissions taken into a round", registry=r)
        self.refused = Counter(p + "refused", "uploads refused at intake, by gRPC status", ["status"], registry=r)
        self.submissions = Counter(p + "submissions", "scored submissions by verdict and reason code",
                                   ["verdict", "reason"], registry=r)
        self.score = Histogram(p + "score", "held-out loss reduction of scored submissions", buckets=_SCORE_BUCKETS,
                               registry=r)
        self.eval_seconds = Histogram(p + "eval_seconds", "time to judge one submission", buckets=_SECONDS_BUCKETS,
                                      registry=r)
        self.merge_seconds = Histogram(p + "merge_seconds", "time to merge and publish a version",
                                       buckets=_SECONDS_BUCKETS, registry=r)
        self.version = Gauge(p + "model_version", "latest published model version", registry=r)
        self.round = Gauge(p + "round", "current round", registry=r)
        self.datasets = Counter(p + "datasets", "datasets registered", registry=r)

    def judged(self, v: VerdictRow) -> None:
        self.submissions.labels(verdict=v.verdict, reason=v.code).inc()
        self.score.observe(v.score)
        if v.seconds is not None:
            self.eval_seconds.observe(v.seconds)

    def published(self, version: int, seconds: float) -> None:
        self.rounds.labels(outcome="published").inc()
        self.version.set(version)
        self.merge_seconds.observe(seconds)
