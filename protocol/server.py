"""The validator's gRPC server: framing, admission and limits around a ValidatorBackend.

Handlers stay thin: decode (serde), verify (admission, streams), call one backend function, encode.
Every refusal is a ProtocolError carrying its gRPC status; it is logged and answered, never raised
through the server. A watchdog cancels streams that stop making progress or run too long, so a
stalled peer holds a worker for at most idle_timeout_s.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import grpc

from expertmesh.protocol import expertmesh_pb2_grpc as pbg
from expertmesh.protocol import serde, streams
from expertmesh.protocol.admission import Admission, AdmissionConfig, KeyPolicy
from expertmesh.protocol.backend import ValidatorBackend
from expertmesh.protocol.errors import MalformedEnvelope, Overloaded, ProtocolError, SubmissionInFlight
from expertmesh.protocol.types import Blob, Submission

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (see ValidatorServer.address)
    spool_dir: Path | None = None  # uploads land here; None: a private temp dir removed at stop
    max_workers: int = 32
    max_concurrent_rpcs: int = 256  # calls queued beyond max_workers; beyond this, gRPC answers RESOURCE_EXHAUSTED
    # Uploads and downloads each hold at most this many workers, so the rest always answer GetRound,
    # Status and ListDatasets: a peer that opens streams and sends nothing cannot starve those.
    max_uploads: int = 8
    max_uploads_per_host: int = 4
    max_downloads: int = 8
    first_frame_s: float = 10.0  # an upload without its signed envelope by then is cut
    min_upload_rate: float = 16 * 1024.0  # bytes/s over each rate_window_s after the envelope, or cut
    rate_window_s: float = 10.0
    chunk_bytes: int = streams.CHUNK_BYTES
    max_message_bytes: int = streams.CHUNK_BYTES + streams.ENVELOPE_ALLOWANCE
    idle_timeout_s: float = 60.0  # a stream without a new byte for this long is cancelled
    max_rpc_s: float = 3600.0  # no stream lives longer than this, progressing or not
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be within [0, 65535]")
        if not 1 <= self.max_workers <= 1024 or not self.max_workers <= self.max_concurrent_rpcs <= 1 << 16:
            raise ValueError("max_workers must be within [1, 1024] and max_concurrent_rpcs within "
                             "[max_workers, 65536]")
        if not 1 <= self.max_uploads_per_host <= self.max_uploads or self.max_downloads < 1 \
                or self.max_uploads + self.max_downloads >= self.max_workers:
            raise ValueError("need 1 <= max_uploads_per_host <= max_uploads, max_downloads >= 1, and "
                             "max_uploads + max_downloads < max_workers (the rest answer small calls)")
        if not 4096 <= self.chunk_bytes <= 16 << 20:
            raise ValueError(f"chunk_bytes={self.chunk_bytes} must be within [4 KiB, 16 MiB]")
        if self.max_message_bytes < self.chunk_bytes + streams.ENVELOPE_ALLOWANCE:
            raise ValueError(f"max_message_bytes must be at least chunk_bytes + {streams.ENVELOPE_ALLOWANCE}")
        if not 0.1 <= self.idle_timeout_s <= self.max_rpc_s <= 86_400:
            raise ValueError("need 0.1 <= idle_timeout_s <= max_rpc_s <= 86400 seconds")
        if not 0.1 <= self.first_frame_s <= 3600 or not 0.1 <= self.rate_window_s <= 3600 \
                or not 0 <= self.min_upload_rate <= 1 << 30:
            raise ValueError("need first_frame_s and rate_window_s within [0.1, 3600] seconds and "
                             "min_upload_rate within [0, 1 GiB/s]")


def _host(context: grpc.ServicerContext) -> str:
    """'ipv4:1.2.3.4' from gRPC's 'ipv4:1.2.3.4:port' (ipv6 likewise): the peer's address without its port."""
    return context.peer().rsplit(":", 1)[0]


class _RefusalLog:
    """A refusal is logged once per (peer host, method, reason) per interval, with how many were not."""

    def __init__(self, interval_s: float = 60.0, max_entries: int = 10_000):
        self._interval_s, self._max = interval_s, max_entries
        self._last: dict[tuple[str, str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def warn(self, who: str, method: str, reason: str, message: str) -> None:
        now, slot = time.monotonic(), (who, method, reason)
        with self._lock:
            last, hidden = self._last.get(slot, (-self._interval_s, 0))
            if now - last < self._interval_s:
                self._last[slot] = (last, hidden + 1)
                return
            if len(self._last) >= self._max:
                self._last.clear()
            self._last[slot] = (now, 0)
        more = f" ({hidden} more like it in the last {self._interval_s:.0f}s, not logged)" if hidden else ""
        log.warning("refused %s from %s: %s: %s%s", method, who, reason, message, more)


class _Watch:
    """One watched stream: `progress()` on every new byte; `release()` once the peer's part is done.

    An upload starts unauthenticated; `authenticated()` once its signed envelope passed admission.
    Until then it may be evicted for a newcomer (`_Slots`) and is cut after first_frame_s; after,
    it must keep min_upload_rate over each rate window.
    """

    def __init__(self, watchdog: "_Watchdog", context: grpc.ServicerContext, method: str, upload: bool):
        self.context, self.method, self._watchdog, self.upload = context, method, watchdog, upload
        self.host = _host(context)
        self.started = self.last_progress = self.window_start = time.monotonic()
        self.bytes = self.window_bytes = 0
        self.authed = not upload

    def progress(self, total: int = 0) -> None:
        self.last_progress = time.monotonic()
        self.bytes = total

    def authenticated(self) -> None:
        self.authed = True
        self.window_start, self.window_bytes = time.monotonic(), self.bytes

    def release(self) -> None:
        self._watchdog.forget(self)

    def overdue(self, now: float, cfg: "ServerConfig") -> str | None:
        """Why this stream should be cut now, or None."""
        if now - self.last_progress > cfg.idle_timeout_s:
            return f"idle {now - self.last_progress:.1f}s"
        if now - self.started > cfg.max_rpc_s:
            return f"running {now - self.started:.1f}s"
        if not self.authed and now - self.started > cfg.first_frame_s:
            return f"no signed envelope after {now - self.started:.1f}s"
        if self.upload and self.authed and now - self.window_start >= cfg.rate_window_s:
            rate = (self.bytes - self.window_bytes) / (now - self.window_start)
            if rate < cfg.min_upload_rate:
                return f"{rate:.0f} bytes/s, under the minimum of {cfg.min_upload_rate:.0f}"
            self.window_start, self.window_bytes = now, self.bytes
        return None


class _Watchdog:
    """One thread for all streams: cancels those idle, too slow or over time (gRPC has no server-side deadline).

    It guards against stalled *peers*: a handler releases its watch once the peer's bytes are all in,
    so a slow backend call is bounded by the client's deadline, not cut here.
    """

    def __init__(self, config: "ServerConfig", refusals: _RefusalLog):
        self._cfg, self._refusals = config, refusals
        self._active: set[_Watch] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rpc-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, context: grpc.ServicerContext, method: str, upload: bool = False) -> Iterator[_Watch]:
        w = _Watch(self, context, method, upload)
        with self._lock:
            self._active.add(w)
        try:
            yield w
        finally:
            self.forget(w)

    def forget(self, w: _Watch) -> None:
        with self._lock:
            self._active.discard(w)

    def _run(self) -> None:
        tick = min(1.0, self._cfg.idle_timeout_s / 4, self._cfg.first_frame_s / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                overdue = [(w, why) for w in self._active if (why := w.overdue(now, self._cfg))]
            for w, why in overdue:
                self._refusals.warn(w.host, w.method, "cut", why)
                self.forget(w)
                w.context.cancel()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class _Slots:
    """At most `total` streams of one kind at once, and `per_host` from one peer address.

    A newcomer over a limit evicts the oldest stream that has gone `grace_s` without showing a signed
    envelope (an honest client sends it in its first frame, within milliseconds): so silent streams
    cannot hold the slots, and a signed upload in progress is never displaced. When none can go, the
    newcomer is refused with Overloaded (UNAVAILABLE, "busy: "), which clients resend after a backoff.
    """

    def __init__(self, kind: str, total: int, per_host: int, grace_s: float = 1.0):
        self.kind, self.total, self.per_host, self.grace_s = kind, total, per_host, grace_s
        self._held: list[_Watch] = []  # oldest first
        self._lock = threading.Lock()

    def acquire(self, w: _Watch) -> None:
        now = time.monotonic()
        with self._lock:
            for counted, limit in ((self._held, self.total), ([h for h in self._held if h.host == w.host],
                                                               self.per_host)):
                if len(counted) >= limit:
                    victim = next((h for h in counted if not h.authed and now - h.started >= self.grace_s), None)
                    if victim is None:
                        raise Overloaded(f"{len(counted)} {self.kind}s are in progress, this node's limit"
                                         f"{' for one address' if limit == self.per_host else ''}; retry shortly")
                    self._held.remove(victim)
                    victim.context.cancel()
            self._held.append(w)

    def release(self, w: _Watch) -> None:
        with self._lock:
            if w in self._held:
                self._held.remove(w)

    @contextmanager
    def hold(self, w: _Watch) -> Iterator[None]:
        self.acquire(w)
        try:
            yield
        finally:
            self.release(w)


class _Servicer(pbg.ValidatorServicer):
    def __init__(self, backend: ValidatorBackend, admission: Admission, config: ServerConfig, spool_dir: Path,
                 watchdog: _Watchdog, refusals: _RefusalLog):
        self._backend, self._admission, self._config = backend, admission, config
        self._spool_dir, self._watchdog, self._refusals = spool_dir, watchdog, refusals
        self._uploads = _Slots("upload", config.max_uploads, config.max_uploads_per_host,
                               grace_s=min(1.0, config.first_frame_s))
        self._downloads = _Slots("download", config.max_downloads, config.max_downloads)
        self._inflight: set[bytes] = set()
        self._inflight_lock = threading.Lock()

    def _answer(self, context: grpc.ServicerContext, method: str, fn: Callable):
        return _answer(context, method, fn, self._refusals)

    # --- uploads -------------------------------------------------------------------------------
    def CommitDelta(self, request, context):
        def commit():
            sub = self._admission.verify("commit", serde.signed_envelope_from_proto(request))
            receipt = self._backend.commit_delta(sub)
            self._admission.record(sub)  # only a commitment the backend took uses a nonce
            return serde.receipt_to_proto(receipt)
        return self._answer(context, "CommitDelta", commit)

    def SubmitDelta(self, request_iterator, context):
        return self._answer(context, "SubmitDelta", lambda: serde.receipt_to_proto(
            self._upload("delta", request_iterator, context)))

    def RegisterDataset(self, request_iterator, context):
        return self._answer(context, "RegisterDataset", lambda: serde.dataset_receipt_to_proto(
            self._upload("dataset", request_iterator, context)))

    def _upload(self, kind: str, request_iterator, context):
        admit, accept = ((self._backend.admit_delta, self._backend.accept_delta) if kind == "delta"
                         else (self._backend.admit_dataset, self._backend.accept_dataset))
        with self._watchdog.watch(context, kind, upload=True) as watch, self._uploads.hold(watch):
            frames = (serde.upload_frame_from_proto(m) for m in request_iterator)
            signed, first_data = next(frames, (None, b""))
            if signed is None:
                raise MalformedEnvelope("the first frame of an upload must carry the signed envelope")
            # Everything cheap before any payload is read, and the nonce recorded only once it is taken.
            sub = self._admission.verify(kind, signed)
            earlier = admit(sub)
            if earlier is not None:
                log.info("%s %s is a resubmission; answering with the earlier receipt", kind, sub.digest.hex()[:16])
                return earlier
            watch.authenticated()

            def pieces() -> Iterator[bytes]:
                yield first_data
                for env, piece in frames:
                    if env is not None:
                        raise MalformedEnvelope("only the first frame of an upload may carry an envelope")
                    yield piece

            with self._exclusive(sub):
                path = streams.spool(pieces(), self._spool_dir, expected_size=sub.envelope.payload_size,
                                     expected_sha256=sub.envelope.payload_sha256, on_progress=watch.progress)
                watch.release()
                try:
                    receipt = accept(sub, path)
                finally:
                    path.unlink(missing_ok=True)
                self._admission.record(sub)
                return receipt

    @contextmanager
    def _exclusive(self, sub: Submission) -> Iterator[None]:
        # Two streams of one signed submission at once would race in the backend: the later one is refused.
        with self._inflight_lock:
            if sub.digest in self._inflight:
                raise SubmissionInFlight("this submission is already being uploaded on another stream; "
                                         "wait for that upload to finish, then retry with the same envelope")
            self._inflight.add(sub.digest)
        try:
            yield
        finally:
            with self._inflight_lock:
                self._inflight.discard(sub.digest)

    # --- downloads -----------------------------------------------------------------------------
    def GetManifest(self, request, context):
        return self._download(context, "GetManifest",
                              lambda: self._backend.manifest_blob(serde.manifest_request_from_proto(request)))

    def GetCheckpoint(self, request, context):
        return self._download(context, "GetCheckpoint",
                              lambda: self._backend.checkpoint_blob(serde.checkpoint_ref_from_proto(request)))

    def GetDataset(self, request, context):
        return self._download(context, "GetDataset",
                              lambda: self._backend.dataset_blob(serde.dataset_request_from_proto(request)))

    def _download(self, context, method: str, get_blob: Callable[[], Blob]):
        blob = self._answer(context, method, get_blob)
        with self._watchdog.watch(context, method) as watch:
            self._answer(context, method, lambda: self._downloads.acquire(watch))
            try:
                pieces = streams.iter_chunks(blob.path, self._config.chunk_bytes)
                header, sent = blob.header, 0
                for piece in pieces:
                    yield serde.blob_frame_to_proto(header, piece)
                    header, sent = None, sent + len(piece)
                    watch.progress(sent)
                if header is not None:  # an empty blob still sends its header
                    yield serde.blob_frame_to_proto(header, b"")
            except OSError:  # the backend's file vanished or broke mid-stream: its problem, not the peer's
                log.exception("%s could not read %s", method, blob.path)
                context.abort(grpc.StatusCode.INTERNAL, f"{method} failed inside the server; see its log")
            finally:
                self._downloads.release(watch)

    # --- small calls ---------------------------------------------------------------------------
    def ListDatasets(self, request, context):
        return self._answer(context, "ListDatasets", lambda: serde.dataset_list_to_proto(
            self._backend.list_datasets(serde.dataset_query_from_proto(request))))

    def GetRound(self, request, context):
        return self._answer(context, "GetRound", lambda: serde.round_info_to_proto(self._backend.current_round()))

    def Status(self, request, context):
        return self._answer(context, "Status", lambda: serde.node_status_to_proto(self._backend.status()))


def _answer(context: grpc.ServicerContext, method: str, fn: Callable, refusals: _RefusalLog):
    """fn() or the matching gRPC status: the one place a handler's failure becomes a response."""
    try:
        return fn()
    except ProtocolError as exc:
        refusals.warn(_host(context), method, type(exc).__name__, str(exc))
        code, details = grpc.StatusCode[exc.status], str(exc)
    except grpc.RpcError:  # the peer went away, its deadline passed, or the watchdog cancelled it
        log.info("%s ended early (cancelled or past its deadline)", method)
        code, details = grpc.StatusCode.CANCELLED, "the call ended before it completed"
    except Exception:
        log.exception("%s failed inside the server", method)
        code, details = grpc.StatusCode.INTERNAL, f"{method} failed inside the server; see its log"
    context.abort(code, details)


class ValidatorServer:
    """A running gRPC server around a backend: `with ValidatorServer(backend, cfg) as srv: srv.address`."""

    def __init__(self, backend: ValidatorBackend, config: ServerConfig = ServerConfig(),
                 policy: KeyPolicy | None = None):
        self.config = config
        self.admission = Admission(config.admission, policy)
        self._own_spool = config.spool_dir is None
        self.spool_dir = Path(tempfile.mkdtemp(prefix="expertmesh-spool-")) if self._own_spool else config.spool_dir
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        refusals = _RefusalLog()
        self._watchdog = _Watchdog(config, refusals)
        opts = [("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0)]
        self._executor = futures.ThreadPoolExecutor(config.max_workers, thread_name_prefix="rpc")
        self._server = grpc.server(self._executor, options=opts, maximum_concurrent_rpcs=config.max_concurrent_rpcs)
        pbg.add_ValidatorServicer_to_server(
            _Servicer(backend, self.admission, config, self.spool_dir, self._watchdog, refusals), self._server)
        host = f"[{config.host}]" if ":" in config.host else config.host
        self.port = self._server.add_insecure_port(f"{host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port}")
        self._server.start()

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def stop(self, grace_s: float = 1.0) -> None:
        self._server.stop(grace_s).wait()
        # gRPC cancels RPCs but does not join handler threads; wait for them before the spool goes away.
        self._executor.shutdown(wait=True)
        self._watchdog.stop()
        if self._own_spool:
            shutil.rmtree(self.spool_dir, ignore_errors=True)

    def __enter__(self) -> "ValidatorServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
