"""A real gRPC server on 127.0.0.1:0 and real clients: every refusal goes over the wire.

Each refusal test checks the status code and message, then that the same server still takes a
good submission (assert_serves).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from concurrent import futures

import grpc
import pytest
import torch

from expertmesh.protocol import envelope as envelope_mod
from expertmesh.protocol import expertmesh_pb2_grpc as pbg
from expertmesh.protocol import identity, serde
from expertmesh.protocol.admission import AdmissionConfig, KeyPolicy
from expertmesh.protocol.client import ClientConfig, ValidatorClient
from expertmesh.protocol.codec import decode_delta
from expertmesh.protocol.errors import Oversize, PayloadMismatch, RemoteError
from expertmesh.protocol.server import ServerConfig
from expertmesh.protocol.types import CheckpointRef, SignedEnvelope

from protohelpers import FAST, MODEL_SHA, SPEC


def raw_upload(address: str, frames, timeout: float = 10.0, method: str = "SubmitDelta"):
    """Send hand-made frames, bypassing ValidatorClient's framing."""
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        return getattr(pbg.ValidatorStub(ch), method)(iter(frames), timeout=timeout)


def frames_of(env: SignedEnvelope | None, payload: bytes, chunk: int = 1 << 20):
    pieces = [payload[i:i + chunk] for i in range(0, len(payload), chunk)] or [b""]
    return [serde.upload_frame_to_proto(env if i == 0 else None, p) for i, p in enumerate(pieces)]


def resign(key, env: SignedEnvelope, kind: str = "delta", **changes) -> SignedEnvelope:
    parsed = dataclasses.replace(envelope_mod.parse_body(env.body), **changes)
    return envelope_mod.sign_envelope(kind, parsed, key)


def test_submit_delta_decodes_at_the_backend(client, backend, miner_key, delta_payload, sign):
    env = sign(miner_key, delta_payload)
    receipt = client.submit_delta(delta_payload, env)
    assert receipt.submission_id == envelope_mod.digest("delta", env.body)
    assert receipt.round == 1 and receipt.payload_bytes == len(delta_payload)
    sent = decode_delta(delta_payload, SPEC).tensors
    got = backend.decoded[receipt.submission_id]
    assert sent.keys() == got.keys() and all(torch.equal(sent[k], got[k]) for k in sent)


def test_same_signed_submission_twice_is_idempotent(client, backend, miner_key, delta_payload, sign):
    env = sign(miner_key, delta_payload)
    first = client.submit_delta(delta_payload, env)
    again = client.submit_delta(delta_payload, env)
    assert again == first and backend.accept_calls == 1 and backend.admit_calls == 2


def test_upload_from_file_in_many_chunks(client, backend, miner_key, sign, tmp_path):
    data = tmp_path / "big.jsonl"
    data.write_bytes(b'{"text": "x"}\n' * 300_000)  # 4.2 MB: five frames
    receipt = client.register_dataset(data, sign(miner_key, data, kind="dataset", label="tiny math"))
    (info,) = client.list_datasets("math")
    assert info.dataset_id == receipt.dataset_id and info.name == "tiny math" and info.size == data.stat().st_size
    assert client.list_datasets("code") == []
    out = tmp_path / "back.jsonl"
    header = client.fetch_dataset(receipt.dataset_id, out, expected_sha256=info.sha256)
    assert out.read_bytes() == data.read_bytes() and header.size == info.size


def _bad_signature(key, env, payload):
    return frames_of(SignedEnvelope(env.body, bytes([env.signature[0] ^ 1]) + env.signature[1:]), payload)


def _dataset_envelope_for_delta(key, env, payload):  # domain separation: signed for another RPC
    return frames_of(resign(key, env, kind="dataset"), payload)


def _hash_mismatch(key, env, payload):
    return frames_of(env, bytes([payload[0] ^ 1]) + payload[1:])


def _short_payload(key, env, payload):
    return frames_of(env, payload[:-10])


def _longer_than_declared(key, env, payload):
    return frames_of(env, payload + b"extra")


def _stale_timestamp(key, env, payload):
    return frames_of(resign(key, env, timestamp_ms=int(time.time() * 1000) - 900_000), payload)


def _future_timestamp(key, env, payload):
    return frames_of(resign(key, env, timestamp_ms=int(time.time() * 1000) + 900_000), payload)


def _declared_oversize(key, env, payload):
    return frames_of(resign(key, env, payload_size=(1 << 30) + 1), payload)


def _no_envelope(key, env, payload):
    return frames_of(None, payload)


def _malformed_body(key, env, payload):
    return frames_of(SignedEnvelope(env.body[:-3], env.signature), payload)


def _envelope_twice(key, env, payload):
    frames = frames_of(env, payload, chunk=len(payload) // 2 + 1)
    return [frames[0], serde.upload_frame_to_proto(env, b"") , *frames[1:]]


def _wrong_round(key, env, payload):
    return frames_of(resign(key, env, round=7), payload)


def _not_a_delta(key, env, payload):
    junk = b"\x00" * 64
    return frames_of(resign(key, env, payload_size=64, payload_sha256=__import__("hashlib").sha256(junk).digest()), junk)


REFUSALS = [
    (_bad_signature, "UNAUTHENTICATED", "bad signature"),
    (_dataset_envelope_for_delta, "UNAUTHENTICATED", "bad signature"),
    (_hash_mismatch, "DATA_LOSS", "hash mismatch"),
    (_short_payload, "DATA_LOSS", "ended after"),
    (_longer_than_declared, "RESOURCE_EXHAUSTED", "exceeds its declared size"),
    (_stale_timestamp, "OUT_OF_RANGE", "outside"),
    (_future_timestamp, "OUT_OF_RANGE", "outside"),
    (_declared_oversize, "RESOURCE_EXHAUSTED", "exceeds this node's limit"),
    (_no_envelope, "INVALID_ARGUMENT", "must carry the signed envelope"),
    (_malformed_body, "INVALID_ARGUMENT", "malformed envelope"),
    (_envelope_twice, "INVALID_ARGUMENT", "only the first frame"),
    (_wrong_round, "FAILED_PRECONDITION", "not open"),
    (_not_a_delta, "INVALID_ARGUMENT", "invalid delta"),
]


@pytest.mark.parametrize("make_frames, code, fragment", REFUSALS, ids=[r[0].__name__.strip("_") for r in REFUSALS])
def test_refusal_then_serves(server, backend, miner_key, delta_payload, sign, assert_serves, make_frames, code,
                             fragment):
    env = sign(miner_key, delta_payload)
    with pytest.raises(grpc.RpcError) as err:
        raw_upload(server.address, make_frames(miner_key, env, delta_payload))
    assert err.value.code().name == code and fragment in err.value.details()
    assert backend.accept_calls == 0 and not list(server.spool_dir.iterdir())  # nothing taken, nothing left
    assert_serves()


def test_replayed_nonce_with_another_header(client, miner_key, delta_payload, sign, assert_serves):
    env = sign(miner_key, delta_payload)
    client.submit_delta(delta_payload, env)
    reused = resign(miner_key, env, label="edited")  # same nonce, different signed header
    with pytest.raises(RemoteError) as err:
        client.submit_delta(delta_payload, reused)
    assert err.value.code == "ALREADY_EXISTS" and "replayed nonce" in err.value.details
    assert_serves()


def test_unknown_and_banned_keys(make_server, backend, miner_key, delta_payload, sign):
    stranger = identity.generate_key()
    policy = KeyPolicy(allow=frozenset({identity.public_bytes(miner_key), identity.public_bytes(stranger)}))
    server = make_server(policy=policy)
    outsider = identity.generate_key()
    with ValidatorClient(server.address) as c:
        with pytest.raises(RemoteError) as err:
            c.submit_delta(delta_payload, sign(outsider, delta_payload))
        assert err.value.code == "PERMISSION_DENIED" and "allow list" in err.value.details
        policy.ban(identity.public_bytes(stranger))
        with pytest.raises(RemoteError) as err:
            c.submit_delta(delta_payload, sign(stranger, delta_payload))
        assert err.value.code == "PERMISSION_DENIED" and "banned" in err.value.details
        assert c.submit_delta(delta_payload, sign(miner_key, delta_payload)).payload_bytes == len(delta_payload)
    assert backend.accept_calls == 1


def test_frame_over_message_limit(server, miner_key, delta_payload, sign, assert_serves):
    big = bytes(server.config.max_message_bytes + 1)
    env = sign(miner_key, big)
    with pytest.raises(grpc.RpcError) as err:
        raw_upload(server.address, [serde.upload_frame_to_proto(env, big)])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_serves()


def test_stalled_peer_is_cut_off_while_others_are_served(server, miner_key, delta_payload, sign, assert_serves):
    env = sign(miner_key, delta_payload)
    release = threading.Event()

    def stall():
        yield serde.upload_frame_to_proto(env, delta_payload[:100])
        release.wait(20)  # a peer that sends its header and then nothing

    with futures.ThreadPoolExecutor(1) as pool:
        stalled = pool.submit(raw_upload, server.address, stall(), 20.0)
        time.sleep(0.2)
        assert_serves()  # served while the stalled stream is open
        with pytest.raises(grpc.RpcError) as err:
            stalled.result(timeout=30)
        release.set()
    # CANCELLED is the idle watchdog's cut (the client's own 20 s deadline would be DEADLINE_EXCEEDED).
    assert err.value.code() == grpc.StatusCode.CANCELLED
    # The handler removes its partial spool file as it unwinds, which may be after the client has
    # seen the cancellation: wait for that, not for a guess of how long it takes.
    deadline = time.monotonic() + 60
    while list(server.spool_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(server.spool_dir.iterdir())
    # the stream was cut, never completed: a retry of the same signed envelope is a resubmission, taken once
    with ValidatorClient(server.address) as c:
        assert c.submit_delta(delta_payload, env).payload_bytes == len(delta_payload)


def test_same_submission_on_two_streams_at_once(server, backend, miner_key, delta_payload, sign, client):
    env = sign(miner_key, delta_payload)
    release = threading.Event()

    def slow():
        yield serde.upload_frame_to_proto(env, delta_payload[:100])
        release.wait(10)
        yield serde.upload_frame_to_proto(None, delta_payload[100:])

    with futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(raw_upload, server.address, slow(), 20.0)
        while backend.admit_calls == 0:
            time.sleep(0.01)
        time.sleep(0.1)
        with pytest.raises(RemoteError) as err:
            client.submit_delta(delta_payload, env)
        assert err.value.code == "ABORTED"
        release.set()
        assert serde.receipt_from_proto(first.result(timeout=10)).payload_bytes == len(delta_payload)
    assert client.submit_delta(delta_payload, env) == backend.receipts[envelope_mod.digest("delta", env.body)]


def test_slow_backend_is_not_cut_by_the_idle_watchdog(client, backend, miner_key, delta_payload, sign, server):
    backend.accept_delay_s = server.config.idle_timeout_s * 1.5  # the peer is done; only the backend is slow
    assert client.submit_delta(delta_payload, sign(miner_key, delta_payload)).payload_bytes == len(delta_payload)


def test_client_deadline_and_backend_bug(client, backend, miner_key, delta_payload, sign, assert_serves):
    backend.accept_delay_s = 1.0
    with pytest.raises(RemoteError) as err:
        client.submit_delta(delta_payload, sign(miner_key, delta_payload), timeout_s=0.3)
    assert err.value.code == "DEADLINE_EXCEEDED"
    backend.accept_delay_s = 0.0
    backend.fail_status = True
    with pytest.raises(RemoteError) as err:
        client.status()
    assert err.value.code == "INTERNAL" and "a bug" not in err.value.details  # internals stay in the log
    backend.fail_status = False
    assert client.status().role == "validator"
    assert_serves()


def test_small_calls_round_trip(client, backend):
    assert client.get_round() == backend.current_round()
    assert client.status() == backend.status()


def test_downloads_verify_and_bound(client, backend, tmp_path):
    model = backend.published / "model.safetensors"
    header = client.fetch_checkpoint_file(CheckpointRef(1, "model.safetensors"), tmp_path / "m.st")
    assert (tmp_path / "m.st").read_bytes() == model.read_bytes() and header.size == model.stat().st_size
    assert client.fetch_manifest(tmp_path / "man.json").version == 1
    assert client.fetch_manifest(tmp_path / "man1.json", version=1).name == "manifest.json"
    with pytest.raises(RemoteError) as err:
        client.fetch_manifest(tmp_path / "x.json", version=9)
    assert err.value.code == "NOT_FOUND"
    with pytest.raises(PayloadMismatch):
        client.fetch_checkpoint_file(CheckpointRef(1, "model.safetensors"), tmp_path / "bad.st",
                                     expected_sha256=bytes(32))
    small = ClientConfig(max_download_bytes=1 << 20, max_manifest_bytes=1 << 10)
    with ValidatorClient(client.address, small) as c, pytest.raises(Oversize):
        c.fetch_checkpoint_file(CheckpointRef(1, "model.safetensors"), tmp_path / "big.st")
    assert not (tmp_path / "bad.st").exists() and not (tmp_path / "big.st").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backend", "m.st", "man.json", "man1.json"]


def test_unreachable_server_fails_within_deadline():
    t0 = time.monotonic()
    with ValidatorClient("127.0.0.1:1", ClientConfig(call_timeout_s=1.0)) as c, pytest.raises(RemoteError) as err:
        c.get_round()
    assert err.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and time.monotonic() - t0 < 5


def test_config_bounds():
    with pytest.raises(ValueError, match="max_message_bytes"):
        ServerConfig(max_message_bytes=1 << 20)
    with pytest.raises(ValueError, match="idle_timeout_s"):
        ServerConfig(idle_timeout_s=100, max_rpc_s=10)
    with pytest.raises(ValueError, match="timestamp_window_s"):
        AdmissionConfig(timestamp_window_s=0)
    with pytest.raises(ValueError, match="min_upload_rate"):
        ClientConfig(min_upload_rate=1)
    assert FAST.idle_timeout_s == 1.0 and MODEL_SHA


def test_backend_file_missing_mid_download(client, backend, tmp_path, monkeypatch):
    good = backend.checkpoint_blob(CheckpointRef(1, "model.safetensors"))
    monkeypatch.setattr(backend, "checkpoint_blob", lambda ref: dataclasses.replace(good, path=tmp_path / "gone"))
    with pytest.raises(RemoteError) as err:
        client.fetch_checkpoint_file(CheckpointRef(1, "model.safetensors"), tmp_path / "out.st")
    assert err.value.code == "INTERNAL" and not (tmp_path / "out.st").exists()
    monkeypatch.undo()
    assert client.fetch_checkpoint_file(CheckpointRef(1, "model.safetensors"), tmp_path / "out.st").size == good.header.size
