"""Prometheus metrics of one miner, in its own registry (no process-global collectors).

Served over HTTP only when metrics is enabled (a nonzero metrics.port implies it), on metrics.host (loopback by default).
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge

from expertmesh.node.metrics import MetricsEndpoint


class MinerMetrics(MetricsEndpoint):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        p = "expertmesh_miner_"
        self.submissions = Counter(p + "submissions", "submissions by outcome (received, refused)", ["outcome"],
                                   registry=r)
        self.not_taking_part = Counter(p + "waits", "times the miner could not take part, by reason", ["reason"],
                                       registry=r)
        self.round = Gauge(p + "round", "round being worked on", registry=r)
        self.model_version = Gauge(p + "model_version", "model version being trained", registry=r)
        self.inner_step = Gauge(p + "inner_step", "inner step reached this round", registry=r)
        self.train_loss = Gauge(p + "train_loss", "loss of the last inner step", registry=r)
        self.tokens_per_second = Gauge(p + "tokens_per_second", "inner-loop throughput", registry=r)
        self.tokens = Counter(p + "tokens_trained", "tokens trained on", registry=r)
        self.selected_experts = Gauge(p + "selected_experts", "experts selected for this round", registry=r)
        self.payload_bytes = Gauge(p + "payload_bytes", "size of the last encoded delta", registry=r)
        self.download_bytes = Counter(p + "download_bytes", "checkpoint and dataset bytes fetched", registry=r)
