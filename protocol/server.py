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
from expertmesh.protocol.errors import MalformedEnvelope, ProtocolError, SubmissionInFlight
from expertmesh.protocol.types import Blob, Submission

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (see ValidatorServer.address)
    spool_dir: Path | None = None  # uploads land here; None: a private temp dir removed at stop
    max_workers: int = 16
    max_concurrent_rpcs: int = 16  # beyond this, gRPC answers RESOURCE_EXHAUSTED instead of queueing
    chunk_bytes: int = streams.CHUNK_BYTES
    max_message_bytes: int = streams.CHUNK_BYTES + streams.ENVELOPE_ALLOWANCE
    idle_timeout_s: float = 60.0  # a stream without a new byte for this long is cancelled
    max_rpc_s: float = 3600.0  # no stream lives longer than this, progressing or not
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port} must be within [0, 65535]")
        if not 1 <= self.max_workers <= 1024 or not 1 <= self.max_concurrent_rpcs <= 4096:
            raise ValueError("max_workers must be within [1, 1024] and max_concurrent_rpcs within [1, 4096]")
        if not 4096 <= self.chunk_bytes <= 16 << 20:
            raise ValueError(f"chunk_bytes={self.chunk_bytes} must be within [4 KiB, 16 MiB]")
        if self.max_message_bytes < self.chunk_bytes + streams.ENVELOPE_ALLOWANCE:
            raise ValueError(f"max_message_bytes must be at least chunk_bytes + {streams.ENVELOPE_ALLOWANCE}")
        if not 0.1 <= self.idle_timeout_s <= self.max_rpc_s <= 86_400:
            raise ValueError("need 0.1 <= idle_timeout_s <= max_rpc_s <= 86400 seconds")


class _Watch:
    """One watched stream: `progress()` on every new byte; `release()` once the peer's part is done."""

    def __init__(self, watchdog: "_Watchdog", context: grpc.ServicerContext, method: str):
        self.context, self.method, self._watchdog = context, method, watchdog
        self.started = self.last_progress = time.monotonic()

    def progress(self, _: int = 0) -> None:
        self.last_progress = time.monotonic()

    def release(self) -> None:
        self._watchdog.forget(self)


class _Watchdog:
    """One thread for all streams: cancels those idle or over time (gRPC has no server-side deadline).

    It guards against stalled *peers*: a handler releases its watch once the peer's bytes are all in,
    so a slow backend call is bounded by the client's deadline, not cut here.
    """

    def __init__(self, idle_s: float, max_s: float):
        self._idle_s, self._max_s = idle_s, max_s
        self._active: set[_Watch] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rpc-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, context: grpc.ServicerContext, method: str) -> Iterator[_Watch]:
        w = _Watch(self, context, method)
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
        tick = min(1.0, self._idle_s / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                overdue = [w for w in self._active
                           if now - w.last_progress > self._idle_s or now - w.started > self._max_s]
            for w in overdue:
                log.warning("cancelling %s from %s: idle %.1fs, running %.1fs", w.method, w.context.peer(),
                            now - w.last_progress, now - w.started)
                self.forget(w)
                w.context.cancel()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class _Servicer(pbg.ValidatorServicer):
    def __init__(self, backend: ValidatorBackend, admission: Admission, config: ServerConfig, spool_dir: Path,
                 watchdog: _Watchdog):
        self._backend, self._admission, self._config = backend, admission, config
        self._spool_dir, self._watchdog = spool_dir, watchdog
        self._inflight: set[bytes] = set()
        self._inflight_lock = threading.Lock()

    # --- uploads -------------------------------------------------------------------------------
    def CommitDelta(self, request, context):
        def commit():
            sub = self._admission.admit("commit", serde.signed_envelope_from_proto(request))
            return serde.receipt_to_proto(self._backend.commit_delta(sub))
        return _answer(context, "CommitDelta", commit)

    def SubmitDelta(self, request_iterator, context):
        return _answer(context, "SubmitDelta", lambda: serde.receipt_to_proto(
            self._upload("delta", request_iterator, context)))

    def RegisterDataset(self, request_iterator, context):
        return _answer(context, "RegisterDataset", lambda: serde.dataset_receipt_to_proto(
            self._upload("dataset", request_iterator, context)))

    def _upload(self, kind: str, request_iterator, context):
        admit, accept = ((self._backend.admit_delta, self._backend.accept_delta) if kind == "delta"
                         else (self._backend.admit_dataset, self._backend.accept_dataset))
        with self._watchdog.watch(context, kind) as watch:
            frames = (serde.upload_frame_from_proto(m) for m in request_iterator)
            signed, first_data = next(frames, (None, b""))
            if signed is None:
                raise MalformedEnvelope("the first frame of an upload must carry the signed envelope")
            sub = self._admission.admit(kind, signed)  # everything cheap, before any payload is read
            earlier = admit(sub)
            if earlier is not None:
                log.info("%s %s is a resubmission; answering with the earlier receipt", kind, sub.digest.hex()[:16])
                return earlier

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
                    return accept(sub, path)
                finally:
                    path.unlink(missing_ok=True)

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
        blob = _answer(context, method, get_blob)
        with self._watchdog.watch(context, method) as watch:
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

    # --- small calls ---------------------------------------------------------------------------
    def ListDatasets(self, request, context):
        return _answer(context, "ListDatasets", lambda: serde.dataset_list_to_proto(
            self._backend.list_datasets(serde.dataset_query_from_proto(request))))

    def GetRound(self, request, context):
        return _answer(context, "GetRound", lambda: serde.round_info_to_proto(self._backend.current_round()))

    def Status(self, request, context):
        return _answer(context, "Status", lambda: serde.node_status_to_proto(self._backend.status()))


def _answer(context: grpc.ServicerContext, method: str, fn: Callable):
    """fn() or the matching gRPC status: the one place a handler's failure becomes a response."""
    try:
        return fn()
    except ProtocolError as exc:
        log.warning("refused %s from %s: %s: %s", method, context.peer(), type(exc).__name__, exc)
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
        self._watchdog = _Watchdog(config.idle_timeout_s, config.max_rpc_s)
        opts = [("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0)]
        self._executor = futures.ThreadPoolExecutor(config.max_workers, thread_name_prefix="rpc")
        self._server = grpc.server(self._executor, options=opts, maximum_concurrent_rpcs=config.max_concurrent_rpcs)
        pbg.add_ValidatorServicer_to_server(
            _Servicer(backend, self.admission, config, self.spool_dir, self._watchdog), self._server)
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
