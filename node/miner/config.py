"""The miner's one typed config: a TOML file validated by pydantic; CLI flags only override fields.

Unknown keys are errors (a typo must not silently fall back to a default), every number has bounds,
and `load_config` turns any problem into one ConfigError line naming the field. README.md ("Run a
miner") has a complete example file and the reference of every field.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from expertmesh.protocol.codec import CodecConfig
from expertmesh.node.train import TrainConfig
from expertmesh.node.tomlconfig import ConfigError, MetricsSection, Section, load, parse  # noqa: F401  (ConfigError: part of this module's API)
from expertmesh.protocol.types import DOMAIN_RE

ADDRESS_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")




class ValidatorSection(Section):
    address: str = Field("", description="validator HOST:PORT; empty: find one on the DHT through initial_peers")
    initial_peers: tuple[str, ...] = Field((), description="DHT bootstrap multiaddrs (`expertmesh bootstrap` prints them)")
    call_timeout_s: float = Field(10.0, gt=0, le=3600, description="deadline of every small call")
    max_checkpoint_bytes: int = Field(64 << 30, ge=1 << 20, le=1 << 44, description="refuse larger model versions")
    max_dataset_bytes: int = Field(16 << 30, ge=1024, le=1 << 44, description="refuse larger dataset downloads")


class DataSection(Section):
    path: Path | None = Field(None, description="local dataset file; absent: the domain's registered train split(s)")
    text_field: str | None = Field(None, description="record field holding the text (default 'text')")
    template: str | None = Field(None, description='render records with a template, e.g. "{question}\\n{answer}"')
    max_tokens: int = Field(2_000_000, ge=256, le=1 << 40, description="training tokens read from the data")

    @model_validator(mode="after")
    def _one_renderer(self) -> "DataSection":
        if self.text_field is not None and self.template is not None:
            raise ValueError("give data.text_field or data.template, not both")
        return self


# The inner-loop defaults (p, steps) differ from the standalone `expertmesh train` ones (node.defaults,
# the best single-domain point of scripts/bench_quality.py: p 0.5, lr 1e-3) on purpose: here each round's
# delta is merged with the other domains' deltas, and what one domain's experts learn also moves the loss
# of the others (their tokens route there too). Measured with scripts/replay_outer.py (3 domains,
# validator defaults: outer lr 1, no momentum; docs/BENCHMARKS.md "outer step"): p 0.2 / lr 1e-3 / 30
# steps improves every domain in 9 of 10 rounds (math +0.003 in round 9); p 0.5 gains more in the first
# rounds but literature gets 0.017 worse in round 4, and lr 2e-3 makes math worse in round 4.


class SelectSection(Section):
    p: float = Field(0.2, gt=0, le=1, description="cumulative routing share to cover per layer (ESFT)")
    score: Literal["token", "gate"] = "token"
    min_per_layer: int = Field(1, ge=0, le=4096)
    max_per_layer: int = Field(0, ge=0, le=4096, description="0: no cap")
    profile_tokens: int = Field(16_384, ge=256, le=1 << 32, description="tokens routed to profile the domain")


class TrainSection(TrainConfig):
    """The trainer's own TrainConfig, with the network's defaults and what a daemon adds."""

    steps: int = Field(30, ge=1, le=1_000_000, description="H: inner AdamW steps per round")
    lr: float = Field(1e-3, gt=0, lt=1)
    batch_size: int = Field(8, ge=1, le=4096, description="rows of seq_len tokens per step")
    seq_len: int = Field(256, ge=8, le=1 << 16)
    seed: int = Field(0, ge=0, le=2**31 - 1, description="the round number is added, so rounds see different batches")
    checkpoint_every: int = Field(10, ge=1, le=1_000_000, description="save the inner state every N steps (resume)")
    threads: int = Field(0, ge=0, le=1024, description="torch CPU threads; 0: torch's default")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]{1,2})?)$",
                        description="auto: the first CUDA device if there is one, else the CPU")


class LoopSection(Section):
    poll_s: float = Field(2.0, gt=0, le=3600, description="how often to ask for the next round")
    backoff_min_s: float = Field(1.0, gt=0, le=3600)
    backoff_max_s: float = Field(60.0, gt=0, le=86_400)
    max_rounds: int = Field(0, ge=0, le=1_000_000, description="exit after this many submissions by this run (0: run until stopped)")
    progress_every_s: float = Field(5.0, ge=0, le=3600, description="progress line interval on stderr (0: every update)")

    @model_validator(mode="after")
    def _order(self) -> "LoopSection":
        if self.backoff_min_s > self.backoff_max_s:
            raise ValueError("loop.backoff_min_s must be at most loop.backoff_max_s")
        return self


class MinerConfig(Section):
    domain: str = Field(..., description="the domain this miner trains, e.g. math")
    key: Path = Field(..., description="Ed25519 key file (`expertmesh keygen --out miner.key`)")
    state_dir: Path = Field(Path("miner-state"), description="model cache, data, inner checkpoints, residual, submissions")
    validator: ValidatorSection = ValidatorSection()
    data: DataSection = DataSection()
    select: SelectSection = SelectSection()
    train: TrainSection = TrainSection()
    codec: CodecConfig = CodecConfig()  # the codec's own config, not a twin of it
    loop: LoopSection = LoopSection()
    metrics: MetricsSection = MetricsSection()

    @model_validator(mode="after")
    def _consistent(self) -> "MinerConfig":
        if not DOMAIN_RE.match(self.domain):
            raise ValueError(f"domain {self.domain!r} must match {DOMAIN_RE.pattern}")
        address = self.validator.address
        if address and not ADDRESS_RE.match(address):
            raise ValueError(f"validator.address {address!r} must be HOST:PORT")
        if not address and not self.validator.initial_peers:
            raise ValueError("set validator.address (HOST:PORT) or validator.initial_peers (DHT multiaddrs)")
        return self


def parse_config(doc: dict, overrides: dict[str, Any] | None = None, base_dir: Path | None = None) -> MinerConfig:
    """Validate a config document; `overrides` maps dotted field names to values (CLI flags; None: unset)."""
    return parse(MinerConfig, doc, overrides, "miner", base_dir, _resolve_paths)


def _resolve_paths(cfg: MinerConfig, base: Path) -> MinerConfig:
    """Relative paths in a config file are relative to that file, not to where the daemon started."""
    rel = lambda p: p if p is None or p.is_absolute() else base / p  # noqa: E731
    return cfg.model_copy(update={"key": rel(cfg.key), "state_dir": rel(cfg.state_dir),
                                  "data": cfg.data.model_copy(update={"path": rel(cfg.data.path)})})


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> MinerConfig:
    return load(MinerConfig, path, overrides, "miner", "README.md (Run a miner) has an example", _resolve_paths)
