"""Every dataclass survives to_proto/from_proto unchanged; a bad message becomes ProtocolError."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertmesh.protocol import expertmesh_pb2 as pb
from expertmesh.protocol import serde
from expertmesh.protocol.errors import ProtocolError
from expertmesh.protocol.types import (BlobHeader, CheckpointRef, DatasetInfo, DatasetReceipt, NodeStatus, Receipt, RoundInfo,
                            RoundPhase, SignedAnnouncement, SignedEnvelope, ValidatorRecord)

H = bytes(range(32))
CASES = [
    (serde.signed_envelope_to_proto, serde.signed_envelope_from_proto, SignedEnvelope(b"body", b"s" * 64)),
    (serde.receipt_to_proto, serde.receipt_from_proto, Receipt(H, 3, 1234, "queued")),
    (serde.dataset_receipt_to_proto, serde.dataset_receipt_from_proto, DatasetReceipt(H, "ds-1", "ok")),
    (serde.blob_header_to_proto, serde.blob_header_from_proto, BlobHeader("model.safetensors", 2, 10, H)),
    (serde.checkpoint_ref_to_proto, serde.checkpoint_ref_from_proto, CheckpointRef(4, "config.json")),
    (serde.dataset_info_to_proto, serde.dataset_info_from_proto, DatasetInfo("ds", "law", "cases", H, 5, H, 7)),
    (serde.dataset_list_to_proto, serde.dataset_list_from_proto, [DatasetInfo("a", "law", "", H, 0, H, 0)] * 2),
    (serde.round_info_to_proto, serde.round_info_from_proto, RoundInfo(9, 8, H, RoundPhase.CLOSED, ("math", "c"), 1, 0.1)),
    (serde.node_status_to_proto, serde.node_status_from_proto, NodeStatus(H, "validator", "0.1", 1, 2, 3)),
    (serde.manifest_request_to_proto, serde.manifest_request_from_proto, None),
    (serde.manifest_request_to_proto, serde.manifest_request_from_proto, 0),  # version 0 is not "latest"
    (serde.dataset_query_to_proto, serde.dataset_query_from_proto, "code"),
    (serde.dataset_query_to_proto, serde.dataset_query_from_proto, None),
    (serde.dataset_request_to_proto, serde.dataset_request_from_proto, "ds-1"),
    (serde.validator_record_to_bytes, serde.validator_record_from_bytes,
     ValidatorRecord(H, "10.0.0.1:50051", 3, H, 4, ("math",), 100, 200)),
    (serde.signed_announcement_to_bytes, serde.signed_announcement_from_bytes, SignedAnnouncement(b"r", b"s")),
]


@pytest.mark.parametrize("to, back, value", CASES, ids=[c[0].__name__ for c in CASES])
def test_round_trip(to, back, value):
    msg = to(value)
    if isinstance(msg, bytes):
        assert back(msg) == value
    else:  # also through the wire encoding
        assert back(type(msg).FromString(msg.SerializeToString())) == value


def test_frames_round_trip():
    env = SignedEnvelope(b"b", b"s")
    assert serde.upload_frame_from_proto(serde.upload_frame_to_proto(env, b"x")) == (env, b"x")
    assert serde.upload_frame_from_proto(serde.upload_frame_to_proto(None, b"y")) == (None, b"y")
    header = BlobHeader("n", 1, 1, H)
    assert serde.blob_frame_from_proto(serde.blob_frame_to_proto(header, b"z")) == (header, b"z")
    assert serde.blob_frame_from_proto(serde.blob_frame_to_proto(None, b"")) == (None, b"")


@pytest.mark.parametrize("msg, back", [
    (pb.Receipt(submission_id=b"short"), serde.receipt_from_proto),
    (pb.RoundInfo(model_sha256=H, phase=pb.ROUND_PHASE_UNSPECIFIED), serde.round_info_from_proto),
    (pb.RoundInfo(model_sha256=H, phase=pb.ROUND_PHASE_OPEN, domains=["Not A Domain"]), serde.round_info_from_proto),
    (pb.RoundInfo(model_sha256=H, phase=pb.ROUND_PHASE_OPEN), serde.round_info_from_proto),  # no held-out fraction
    (pb.DatasetInfo(dataset_id="x", domain="law", owner_key=H, sha256=b""), serde.dataset_info_from_proto),
    (pb.BlobHeader(name="bad\nname", sha256=H), serde.blob_header_from_proto),
    (pb.DatasetRequest(), serde.dataset_request_from_proto),
])
def test_bad_messages_are_protocol_errors(msg, back):
    with pytest.raises(ProtocolError):
        back(msg)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_record_parsers_only_raise_protocol_error(data):
    for parse in (serde.validator_record_from_bytes, serde.signed_announcement_from_bytes):
        try:
            parse(data)
        except ProtocolError:
            pass
