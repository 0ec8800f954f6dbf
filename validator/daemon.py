"""`expertmesh validator run`: compose storage, model runtime, scheduler, transport and announcer.

Start-up order matters for crash recovery: the ledger is opened, spool files without a ledger row
are swept, version 0 is imported if missing, the latest committed version is loaded (verified
against its manifest), and only then does the server take uploads. SIGTERM/SIGINT set a flag the
scheduler checks between steps, so the current step finishes and the process exits 0.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from expertmesh.node.locks import hold_state_dir
from expertmesh.protocol import identity
from expertmesh.protocol.admission import AdmissionConfig, KeyPolicy
from expertmesh.protocol.server import ServerConfig, ValidatorServer
from expertmesh.validator.announce import Announced, Announcer
from expertmesh.protocol.heldout import load_or_create_key as load_or_create_heldout_key
from expertmesh.validator.config import ValidatorConfig
from expertmesh.validator.evalset import eval_spec
from expertmesh.validator.intake import Intake
from expertmesh.validator.ledger import Ledger
from expertmesh.validator.logs import setup_logging
from expertmesh.validator.metrics import Metrics
from expertmesh.validator.registry import Registry, RegistryLimits
from expertmesh.validator.rounds import RoundBook, now_ms
from expertmesh.validator.runtime import ModelRuntime, import_base
from expertmesh.validator.scheduler import PhaseHooks, Scheduler
from expertmesh.validator.service import ValidatorService
from expertmesh.validator.spool import Spool

log = logging.getLogger("validator")


def load_or_create_key(cfg: ValidatorConfig) -> Ed25519PrivateKey:
    if cfg.key is not None:
        if not cfg.key.exists():
            raise FileNotFoundError(f"key file {cfg.key} not found; create it with `expertmesh keygen --out {cfg.key}`")
        return identity.load_key(cfg.key)
    path = cfg.state_dir / "validator.key"
    if not path.exists():
        identity.save_key(identity.generate_key(), path)
    return identity.load_key(path)


@dataclass
class ValidatorNode:
    """The composed validator; each part is usable alone (tests build parts of it directly)."""

    cfg: ValidatorConfig
    key: Ed25519PrivateKey
    ledger: Ledger
    registry: Registry
    spool: Spool
    book: RoundBook
    runtime: ModelRuntime
    metrics: Metrics
    scheduler: Scheduler
    service: ValidatorService


def build_node(cfg: ValidatorConfig, hooks: PhaseHooks | None = None) -> ValidatorNode:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # e.g. 1 where other work shares the cores: spinning threads stall
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    key = load_or_create_key(cfg)
    ledger = Ledger(cfg.state_dir / "ledger.sqlite")
    spool = Spool(cfg.state_dir / "spool")
    swept = spool.sweep(ledger.spool_paths())
    if swept:
        log.info("swept spool files no unfinished round needs (a crash before their receipt or after their "
                 "round)", extra={"files": swept})
    d = cfg.datasets
    heldout_key = load_or_create_heldout_key(d.heldout_key or cfg.state_dir / "heldout.key")
    registry = Registry(cfg.state_dir / "datasets", ledger, RegistryLimits(d.heldout_fraction, d.max_records,
                                                                         d.max_record_bytes, d.max_bytes,
                                                                         d.max_expansion), heldout_key)
    checkpoints = cfg.state_dir / "checkpoints"
    owner = identity.key_id(identity.public_bytes(key))
    for p in d.preload:
        row = registry.register_file(p.path, p.domain, p.name, owner, p.text_field, p.template)
        log.info("preloaded dataset", extra={"dataset": row.dataset_id, "heldout": row.heldout_records})
    import_base(ledger, checkpoints, cfg.model, now_ms())
    book = RoundBook(ledger, cfg.rounds, lambda t: eval_spec(ledger, cfg.scoring, owner, t))
    book.open_first(base_version=0)
    runtime = ModelRuntime(checkpoints)
    runtime.load(ledger.version(book.current().base_version))
    metrics = Metrics()
    metrics.version.set(ledger.latest_version().version)
    hooks = hooks or PhaseHooks.from_env()
    scheduler = Scheduler(cfg, ledger, book, runtime, registry, spool, metrics, hooks)
    a = cfg.admission
    policy = KeyPolicy.from_files(a.allow_file, a.deny_file)
    intake = Intake(ledger, book, spool, registry, cfg, metrics, policy, hooks)
    service = ValidatorService(intake, ledger, book, registry, checkpoints, identity.public_bytes(key))
    return ValidatorNode(cfg, key, ledger, registry, spool, book, runtime, metrics, scheduler, service)


def serve(node: ValidatorNode, stop: threading.Event) -> None:
    """Run until `stop` is set: the server answers peers while the scheduler works through rounds."""
    cfg = node.cfg
    s = cfg.server
    server_cfg = ServerConfig(host=s.host, port=s.port, spool_dir=node.spool.incoming, max_workers=s.max_workers,
                              max_concurrent_rpcs=max(s.max_concurrent_rpcs, s.max_workers),
                              max_uploads=s.max_uploads, max_uploads_per_host=s.max_uploads_per_host,
                              max_downloads=s.max_downloads, first_frame_s=s.first_frame_s,
                              min_upload_rate=s.min_upload_rate, rate_window_s=s.rate_window_s,
                              idle_timeout_s=s.idle_timeout_s, max_rpc_s=s.max_rpc_s,
                              admission=AdmissionConfig(timestamp_window_s=s.timestamp_window_s,
                                                        max_tracked_nonces=s.max_tracked_nonces,
                                                        max_nonces_per_key=s.max_nonces_per_key,
                                                        max_payload_bytes={"delta": s.max_delta_bytes,
                                                                           "dataset": s.max_dataset_bytes}))
    # the DHT first: hivemind forks its process, which is only safe before gRPC starts its threads
    announcer = Announcer(cfg.dht, node.key) if cfg.dht.enabled else None
    try:
        server = ValidatorServer(node.service, server_cfg, node.service.intake.policy)
    except BaseException:
        if announcer is not None:
            announcer.stop()
        raise
    try:
        print(f"expertmesh-validator: serving on {server.address}", flush=True)
        log.info("serving", extra={"address": server.address, "state_dir": str(cfg.state_dir),
                                   "version": node.runtime.version, "round": node.book.current().round})
        if cfg.metrics.enabled:
            metrics_port = node.metrics.serve(cfg.metrics.host, cfg.metrics.port)
            log.info("metrics", extra={"url": f"http://{cfg.metrics.host}:{metrics_port}/metrics"})
        if announcer is not None:
            announcer.start(f"{cfg.dht.announce_host or s.host}:{server.port}", lambda: _announced(node))
            node.scheduler.on_change = announcer.poke
            log.info("joined the DHT", extra={"maddrs": announcer.maddrs})
        _loop(node, stop)
    finally:
        server.stop(grace_s=2.0)
        if announcer is not None:
            announcer.stop()
        node.metrics.stop()
        node.ledger.close()
        log.info("stopped")


def _announced(node: ValidatorNode) -> Announced:
    info = node.service.current_round()
    return Announced(info.model_version, info.model_sha256, info.round, info.domains)


def _loop(node: ValidatorNode, stop: threading.Event) -> None:
    backoff = 1.0
    while not stop.is_set():
        node.metrics.round.set(node.book.current().round)
        try:
            worked = node.scheduler.step()
            backoff = 1.0
        except Exception:  # a bug or a full disk: log it, keep serving, retry the same step later
            log.exception("round step failed; retrying in %.0fs", backoff)
            stop.wait(backoff)
            backoff = min(backoff * 2, 60.0)
            continue
        if not worked:
            stop.wait(node.cfg.rounds.poll_s)
    log.info("stop requested: the current step is done, shutting down")


def run_daemon(cfg: ValidatorConfig) -> int:
    setup_logging(cfg.log.level, cfg.log.format)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())  # nothing else here: logging could deadlock in a handler
    t0 = time.monotonic()
    with hold_state_dir(cfg.state_dir, "expertmesh validator run"):  # before anything in it is read or written
        node = build_node(cfg)
        log.info("ready", extra={"seconds": round(time.monotonic() - t0, 2)})
        serve(node, stop)
    return 0
