"""The validator's one typed config: a TOML file validated by pydantic; CLI flags only override fields.

Unknown keys are errors (a typo must not silently fall back to a default), every number has bounds,
and `load_config` turns any problem into a ConfigError naming the field and what is allowed.
docs/validator.md has a complete example file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from expertmesh.node.tomlconfig import ConfigError, MetricsSection, Section, load, parse  # noqa: F401  (ConfigError: part of this module's API)

from expertmesh.protocol.types import DOMAIN_RE





class ServerSection(Section):
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0: any free port (logged at start)")
    max_delta_bytes: int = Field(1 << 30, ge=1024, le=1 << 40)
    max_dataset_bytes: int = Field(4 << 30, ge=1024, le=1 << 40)
    timestamp_window_s: float = Field(300.0, ge=1, le=86_400)
    idle_timeout_s: float = Field(60.0, ge=0.1, le=3600)
    max_rpc_s: float = Field(3600.0, ge=0.1, le=86_400, description="no stream lives longer")
    max_workers: int = Field(32, ge=3, le=1024, description="RPC threads; those not held by uploads and "
                             "downloads answer GetRound, Status and ListDatasets")
    max_concurrent_rpcs: int = Field(256, ge=1, le=1 << 16, description="calls queued or running; beyond, "
                                     "RESOURCE_EXHAUSTED")
    max_uploads: int = Field(8, ge=1, le=1024, description="upload streams at once")
    max_uploads_per_host: int = Field(4, ge=1, le=1024, description="upload streams at once from one address")
    max_downloads: int = Field(8, ge=1, le=1024, description="download streams at once")
    first_frame_s: float = Field(10.0, ge=0.1, le=3600, description="an upload without its signed envelope by "
                                 "then is cut")
    min_upload_rate: float = Field(16384.0, ge=0, le=1 << 30, description="bytes/s an upload must keep over each "
                                   "rate_window_s, or it is cut")
    rate_window_s: float = Field(10.0, ge=0.1, le=3600)
    max_tracked_nonces: int = Field(100_000, ge=1, le=10_000_000, description="replay table; when full, its "
                                    "oldest entries are forgotten")
    max_nonces_per_key: int = Field(1_000, ge=1, le=10_000_000, description="one key's share of the replay table")


class RoundsSection(Section):
    duration_s: float = Field(600.0, gt=0, le=30 * 86_400, description="a round closes this long after it opens")
    min_submissions: int = Field(1, ge=1, le=100_000, description="at the deadline with fewer, the deadline moves on")
    max_submissions: int = Field(0, ge=0, le=100_000, description="close as soon as this many arrived (0: only the deadline)")
    max_per_miner: int = Field(1, ge=1, le=1000, description="submissions one key may make per round")
    poll_s: float = Field(0.5, gt=0, le=60)


class ScoringSection(Section):
    domains: tuple[str, ...] = Field((), description="domains scored here; empty: see open_domains")
    open_domains: bool = Field(False, description="with domains empty: score every domain with a registered dataset "
                               "(true) or only those of datasets the operator preloaded (false)")
    eval_tokens: int = Field(16_384, ge=64, le=1 << 30, description="held-out tokens per domain (fixed batches)")
    seq_len: int = Field(256, ge=8, le=1 << 16)
    batch_size: int = Field(16, ge=1, le=4096)
    guard_epsilon: float = Field(0.02, ge=0, le=100,
                                 description="reject when any other scored domain's held-out loss rises by more (nats)")
    min_z: float = Field(4.0, ge=0, le=1000, description="noise rule: the delta's signs must agree with the held-out "
                         "gradient at z >= this (a random-sign delta passes with probability <= exp(-z²/2))")
    owned_p: float = Field(0.6, gt=0, le=1, description="a domain owns, per layer, the experts covering this share "
                           "of its routing (ESFT token score, the validator's own profile of the domain's train data)")
    foreign_experts: int = Field(4, ge=0, le=1 << 20, description="experts outside its domain's a delta may touch")
    profile_tokens: int = Field(16_384, ge=256, le=1 << 30, description="train tokens profiled per domain and round")
    copy_cosine: float = Field(0.98, gt=0, le=1, description="reject as a copy, unevaluated, above this cosine to an "
                               "earlier delta")
    copy_z: float = Field(4.0, ge=0, le=1000, description="copy rule: with the earlier deltas it resembles most "
                          "projected out, what is left of a delta must still pass the noise rule at z >= this")
    copy_span: int = Field(8, ge=0, le=64, description="earlier deltas of the round (highest cosine first) a delta "
                           "is projected on by the copy rule; 0: off")
    negligible_ratio: float = Field(1e-6, ge=0, le=1, description="‖Δ‖/‖W‖ below this scores 0 without evaluation")
    max_update_ratio: float = Field(0.5, gt=0, le=100, description="per-expert cap on ‖Δ_e‖/‖W_e‖")
    min_score: float = Field(0.0, ge=0, le=100, description="accepted only when the score is above this")


class AdmissionSection(Section):
    """Who may submit, and what a new identity costs (docs/SECURITY.md "Identity")."""

    allow_file: Path | None = Field(None, description="only the key ids listed here (one per line, '#' comments) "
                                    "may commit, submit or register; absent: any key not denied")
    deny_file: Path | None = Field(None, description="key ids refused outright")
    pow_bits: int = Field(22, ge=0, le=40, description="proof of work each commitment from a key without standing "
                          "carries: about 2^bits sha256 calls (22: about 2 s on one core); 0: none")
    trusted_after: int = Field(1, ge=1, le=1_000_000, description="accepted deltas in published versions after "
                               "which a key commits without proof of work (listed keys of allow_file: always)")
    max_commits: int = Field(4, ge=1, le=1000, description="commitments one key may hold per round")


class MergeSection(Section):
    # lr 1 and no momentum: each version is its parent plus the mean accepted delta. DiLoCo's lr 0.7 /
    # momentum 0.9 Nesterov overshoots here (scripts/replay_outer.py, docs/BENCHMARKS.md "outer step").
    outer_lr: float = Field(1.0, gt=0, le=10)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = True
    # A merged version may not end worse than its parent on a scored domain that has an accepted delta this
    # round or whose miners' deltas were evaluated (no gain), nor by more than max_regression on one that
    # nobody trained: deltas of other domains that raised its loss are halved, at most regression_tries
    # times (0: off). Measured in scripts/replay_outer.py (docs/
    # BENCHMARKS.md "outer step"): every domain then improves in all 10 rounds.
    max_regression: float = Field(0.002, ge=0, le=100, description="nats/token a scored domain that nobody "
                                  "trained this round may end above its parent")
    regression_tries: int = Field(4, ge=0, le=20, description="halvings tried to meet max_regression (0: off)")


class PublishSection(Section):
    keep_versions: int = Field(3, ge=1, le=10_000, description="published versions kept on disk")


class PreloadDataset(Section):
    domain: str
    path: Path
    name: str = ""
    text_field: str | None = None
    template: str | None = None


class DatasetsSection(Section):
    heldout_fraction: float = Field(0.05, gt=0, lt=1)
    heldout_key: Path | None = Field(None, description="secret keying which records are held out and their order "
                                     "(default: state_dir/heldout.key, created once, mode 0600; never sent)")
    max_records: int = Field(2_000_000, ge=1, le=1 << 32)
    max_record_bytes: int = Field(1 << 20, ge=16, le=1 << 30)
    max_bytes: int = Field(4 << 30, ge=1024, le=1 << 40, description="decompressed bytes of one registration, "
                           "counted while it streams")
    max_expansion: float = Field(64.0, ge=1, le=100_000, description="decompressed bytes per uploaded byte "
                                 "(text gzips 3-5x; a decompression bomb 1000x)")
    preload: tuple[PreloadDataset, ...] = Field((), description="local files registered at start (idempotent)")


class DhtSection(Section):
    enabled: bool = False
    initial_peers: tuple[str, ...] = ()
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    announce_host: str = Field("", description="host put in announcements (default: server.host)")
    record_ttl_s: float = Field(300.0, ge=5, le=3600)
    announce_every_s: float = Field(60.0, ge=1, le=3600)


class LogSection(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


class ValidatorConfig(Section):
    state_dir: Path = Field(Path("validator-state"), description="ledger, spool, checkpoints, datasets, momentum")
    model: Path | None = Field(None, description="base checkpoint imported as version 0 (default: the shipped model)")
    key: Path | None = Field(None, description="Ed25519 key file (default: state_dir/validator.key, created once)")
    threads: int = Field(0, ge=0, le=4096, description="torch CPU threads for scoring and merging (0: torch's default)")
    server: ServerSection = ServerSection()
    rounds: RoundsSection = RoundsSection()
    scoring: ScoringSection = ScoringSection()
    admission: AdmissionSection = AdmissionSection()
    merge: MergeSection = MergeSection()
    publish: PublishSection = PublishSection()
    datasets: DatasetsSection = DatasetsSection()
    dht: DhtSection = DhtSection()
    metrics: MetricsSection = MetricsSection()
    log: LogSection = LogSection()

    @model_validator(mode="after")
    def _consistent(self) -> "ValidatorConfig":
        domains = list(self.scoring.domains) + [p.domain for p in self.datasets.preload]
        bad = [d for d in domains if not DOMAIN_RE.match(d)]
        if bad:
            raise ValueError(f"domain names {bad} must match {DOMAIN_RE.pattern}")
        if self.rounds.max_submissions and self.rounds.max_submissions < self.rounds.min_submissions:
            raise ValueError("rounds.max_submissions must be 0 or at least rounds.min_submissions")
        if self.scoring.eval_tokens < self.scoring.seq_len:
            raise ValueError("scoring.eval_tokens must be at least scoring.seq_len")
        s = self.server
        if s.max_uploads_per_host > s.max_uploads:
            raise ValueError("server.max_uploads_per_host must be at most server.max_uploads")
        if s.max_uploads + s.max_downloads >= s.max_workers:
            raise ValueError("server.max_uploads + server.max_downloads must be under server.max_workers "
                             "(the workers left answer GetRound and Status)")
        if s.max_nonces_per_key > s.max_tracked_nonces:
            raise ValueError("server.max_nonces_per_key must be at most server.max_tracked_nonces")
        return self


def parse_config(doc: dict, overrides: dict[str, Any] | None = None, base_dir: Path | None = None) -> ValidatorConfig:
    """Validate a config document; `overrides` maps dotted field names to values (CLI flags)."""
    return parse(ValidatorConfig, doc, overrides, "validator", base_dir, _resolve_paths)


def _resolve_paths(cfg: ValidatorConfig, base: Path) -> ValidatorConfig:
    """Relative paths in a config file are relative to that file, not to wherever the daemon was started."""
    rel = lambda p: p if p is None or p.is_absolute() else base / p  # noqa: E731
    preload = tuple(p.model_copy(update={"path": rel(p.path)}) for p in cfg.datasets.preload)
    datasets = cfg.datasets.model_copy(update={"preload": preload, "heldout_key": rel(cfg.datasets.heldout_key)})
    admission = cfg.admission.model_copy(update={"allow_file": rel(cfg.admission.allow_file),
                                                 "deny_file": rel(cfg.admission.deny_file)})
    return cfg.model_copy(update={"state_dir": rel(cfg.state_dir), "model": rel(cfg.model), "key": rel(cfg.key),
                                  "datasets": datasets, "admission": admission})


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> ValidatorConfig:
    return load(ValidatorConfig, path, overrides, "validator", "see docs/validator.md for an example", _resolve_paths)
