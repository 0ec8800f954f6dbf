"""The one boundary between protobuf messages and the dataclasses in protocol.types.

Paired `x_to_proto` / `x_from_proto`; every `from_proto` builds the dataclass, whose constructor
checks what a peer could get wrong, so a bad message becomes ProtocolError here and nowhere later.
"""
from __future__ import annotations

from expertmesh.protocol import expertmesh_pb2 as pb
from expertmesh.protocol.errors import ProtocolError
from expertmesh.protocol.types import (BlobHeader, CheckpointRef, DatasetInfo, DatasetReceipt, NodeStatus, Receipt,
                            RoundInfo, RoundPhase, SignedAnnouncement, SignedEnvelope, ValidatorRecord)

_PHASE_TO_PROTO = {RoundPhase.OPEN: pb.ROUND_PHASE_OPEN, RoundPhase.CLOSED: pb.ROUND_PHASE_CLOSED}
_PHASE_FROM_PROTO = {v: k for k, v in _PHASE_TO_PROTO.items()}


def signed_envelope_to_proto(x: SignedEnvelope) -> pb.SignedEnvelope:
    return pb.SignedEnvelope(body=x.body, signature=x.signature)


def signed_envelope_from_proto(m: pb.SignedEnvelope) -> SignedEnvelope:
    return SignedEnvelope(body=m.body, signature=m.signature)


def upload_frame_to_proto(envelope: SignedEnvelope | None, data: bytes) -> pb.UploadChunk:
    if envelope is None:
        return pb.UploadChunk(data=data)
    return pb.UploadChunk(envelope=signed_envelope_to_proto(envelope), data=data)


def upload_frame_from_proto(m: pb.UploadChunk) -> tuple[SignedEnvelope | None, bytes]:
    """(envelope or None, payload bytes) of one upload frame."""
    return (signed_envelope_from_proto(m.envelope) if m.HasField("envelope") else None), m.data


def blob_frame_to_proto(header: BlobHeader | None, data: bytes) -> pb.BlobChunk:
    if header is None:
        return pb.BlobChunk(data=data)
    return pb.BlobChunk(header=blob_header_to_proto(header), data=data)


def blob_frame_from_proto(m: pb.BlobChunk) -> tuple[BlobHeader | None, bytes]:
    return (blob_header_from_proto(m.header) if m.HasField("header") else None), m.data


def receipt_to_proto(x: Receipt) -> pb.Receipt:
    return pb.Receipt(submission_id=x.submission_id, round=x.round, payload_bytes=x.payload_bytes, message=x.message)


def receipt_from_proto(m: pb.Receipt) -> Receipt:
    return Receipt(submission_id=m.submission_id, round=m.round, payload_bytes=m.payload_bytes, message=m.message)


def dataset_receipt_to_proto(x: DatasetReceipt) -> pb.DatasetReceipt:
    return pb.DatasetReceipt(submission_id=x.submission_id, dataset_id=x.dataset_id, message=x.message)


def dataset_receipt_from_proto(m: pb.DatasetReceipt) -> DatasetReceipt:
    return DatasetReceipt(submission_id=m.submission_id, dataset_id=m.dataset_id, message=m.message)


def blob_header_to_proto(x: BlobHeader) -> pb.BlobHeader:
    return pb.BlobHeader(name=x.name, version=x.version, size=x.size, sha256=x.sha256)


def blob_header_from_proto(m: pb.BlobHeader) -> BlobHeader:
    return BlobHeader(name=m.name, version=m.version, size=m.size, sha256=m.sha256)


def manifest_request_to_proto(version: int | None) -> pb.ManifestRequest:
    return pb.ManifestRequest() if version is None else pb.ManifestRequest(version=version)


def manifest_request_from_proto(m: pb.ManifestRequest) -> int | None:
    return m.version if m.HasField("version") else None


def checkpoint_ref_to_proto(x: CheckpointRef) -> pb.CheckpointRequest:
    return pb.CheckpointRequest(version=x.version, name=x.name)


def checkpoint_ref_from_proto(m: pb.CheckpointRequest) -> CheckpointRef:
    return CheckpointRef(version=m.version, name=m.name)


def dataset_request_to_proto(dataset_id: str) -> pb.DatasetRequest:
    return pb.DatasetRequest(dataset_id=dataset_id)


def dataset_request_from_proto(m: pb.DatasetRequest) -> str:
    if not m.dataset_id:
        raise ProtocolError("dataset_id is empty")
    return m.dataset_id


def dataset_query_to_proto(domain: str | None) -> pb.DatasetQuery:
    return pb.DatasetQuery(domain=domain or "")


def dataset_query_from_proto(m: pb.DatasetQuery) -> str | None:
    return m.domain or None


def dataset_info_to_proto(x: DatasetInfo) -> pb.DatasetInfo:
    return pb.DatasetInfo(dataset_id=x.dataset_id, domain=x.domain, name=x.name, owner_key=x.owner_key,
                          size=x.size, sha256=x.sha256, registered_ms=x.registered_ms)


def dataset_info_from_proto(m: pb.DatasetInfo) -> DatasetInfo:
    return DatasetInfo(dataset_id=m.dataset_id, domain=m.domain, name=m.name, owner_key=m.owner_key,
                       size=m.size, sha256=m.sha256, registered_ms=m.registered_ms)


def dataset_list_to_proto(xs: list[DatasetInfo]) -> pb.DatasetList:
    return pb.DatasetList(datasets=[dataset_info_to_proto(x) for x in xs])


def dataset_list_from_proto(m: pb.DatasetList) -> list[DatasetInfo]:
    return [dataset_info_from_proto(d) for d in m.datasets]


def round_info_to_proto(x: RoundInfo) -> pb.RoundInfo:
    return pb.RoundInfo(round=x.round, model_version=x.model_version, model_sha256=x.model_sha256,
                        phase=_PHASE_TO_PROTO[x.phase], domains=list(x.domains), closes_at_ms=x.closes_at_ms,
                        heldout_fraction=x.heldout_fraction, pow_bits=x.pow_bits)


def round_info_from_proto(m: pb.RoundInfo) -> RoundInfo:
    if m.phase not in _PHASE_FROM_PROTO:
        raise ProtocolError(f"unknown round phase {m.phase}")
    return RoundInfo(round=m.round, model_version=m.model_version, model_sha256=m.model_sha256,
                     phase=_PHASE_FROM_PROTO[m.phase], domains=tuple(m.domains), closes_at_ms=m.closes_at_ms,
                     heldout_fraction=m.heldout_fraction, pow_bits=m.pow_bits)


def round_query_to_proto() -> pb.RoundQuery:
    return pb.RoundQuery()


def status_request_to_proto() -> pb.StatusRequest:
    return pb.StatusRequest()


def node_status_to_proto(x: NodeStatus) -> pb.NodeStatus:
    return pb.NodeStatus(public_key=x.public_key, role=x.role, software_version=x.software_version,
                         model_version=x.model_version, round=x.round, uptime_s=x.uptime_s)


def node_status_from_proto(m: pb.NodeStatus) -> NodeStatus:
    return NodeStatus(public_key=m.public_key, role=m.role, software_version=m.software_version,
                      model_version=m.model_version, round=m.round, uptime_s=m.uptime_s)


def validator_record_to_bytes(x: ValidatorRecord) -> bytes:
    return pb.ValidatorRecord(public_key=x.public_key, endpoint=x.endpoint, model_version=x.model_version,
                              model_sha256=x.model_sha256, round=x.round, domains=list(x.domains),
                              issued_ms=x.issued_ms, expires_ms=x.expires_ms).SerializeToString()


def validator_record_from_bytes(data: bytes) -> ValidatorRecord:
    m = _parse(pb.ValidatorRecord, data)
    return ValidatorRecord(public_key=m.public_key, endpoint=m.endpoint, model_version=m.model_version,
                           model_sha256=m.model_sha256, round=m.round, domains=tuple(m.domains),
                           issued_ms=m.issued_ms, expires_ms=m.expires_ms)


def signed_announcement_to_bytes(x: SignedAnnouncement) -> bytes:
    return pb.SignedAnnouncement(record=x.record, signature=x.signature).SerializeToString()


def signed_announcement_from_bytes(data: bytes) -> SignedAnnouncement:
    m = _parse(pb.SignedAnnouncement, data)
    return SignedAnnouncement(record=m.record, signature=m.signature)


def _parse(cls, data: bytes):
    # protobuf's DecodeError is not a ValueError; callers rely on ProtocolError only.
    try:
        return cls.FromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError and friends on hostile bytes
        raise ProtocolError(f"cannot parse {cls.DESCRIPTOR.name}: {exc}") from None
