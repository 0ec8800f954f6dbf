"""Every error the protocol layer raises on purpose, each tied to the gRPC status a server answers with.

All are ValueError subclasses: they describe bad input (from a peer or a user), never a bug here.
`status` names a grpc.StatusCode member; this module does not import grpc so that pure code
(codec, envelope parsing) stays importable without it.
"""
from __future__ import annotations


class ProtocolError(ValueError):
    """Base class: a message or file that does not follow the protocol."""

    status = "INVALID_ARGUMENT"


class MalformedEnvelope(ProtocolError):
    """The envelope bytes do not follow the fixed layout (docs/protocol.md)."""


class BadSignature(ProtocolError):
    status = "UNAUTHENTICATED"


class UnknownKey(ProtocolError):
    """The node keeps an allow list and the sender is not on it."""

    status = "PERMISSION_DENIED"


class BannedKey(ProtocolError):
    status = "PERMISSION_DENIED"


class StaleTimestamp(ProtocolError):
    """The signed timestamp is outside the receiver's window (clock skew or a late replay)."""

    status = "OUT_OF_RANGE"


class ReplayedNonce(ProtocolError):
    """The sender's nonce was already used for a different signed header."""

    status = "ALREADY_EXISTS"


class SubmissionInFlight(ProtocolError):
    """The same signed submission is being uploaded on another stream right now."""

    status = "ABORTED"


class KeyOverloaded(ProtocolError):
    """One key sent more than its share of envelopes inside the timestamp window."""

    status = "RESOURCE_EXHAUSTED"


class Overloaded(ProtocolError):
    """All of the node's slots of one kind are busy; the same request may be resent shortly (clients do)."""

    status = "UNAVAILABLE"
    prefix = "busy: "

    def __init__(self, message: str):
        super().__init__(self.prefix + message)


class Oversize(ProtocolError):
    status = "RESOURCE_EXHAUSTED"


class PayloadMismatch(ProtocolError):
    """The bytes that arrived are not the bytes the envelope signed (hash or size)."""

    status = "DATA_LOSS"


class DeltaFormatError(ProtocolError):
    """A delta file that is not a valid expertmesh delta for the receiver's model."""


class Rejected(ProtocolError):
    """A backend's refusal of a well-formed request (wrong round, unknown domain, not found...)."""

    ALLOWED = frozenset({"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "PERMISSION_DENIED",
                         "RESOURCE_EXHAUSTED", "ALREADY_EXISTS", "UNAVAILABLE", "UNIMPLEMENTED"})

    def __init__(self, status: str, message: str):
        assert status in self.ALLOWED, status
        super().__init__(message)
        self.status = status


class RemoteError(ConnectionError):
    """A call to a peer failed: `code` is the gRPC status name, `details` the peer's message."""

    def __init__(self, method: str, code: str, details: str):
        super().__init__(f"{method} failed: {code}: {details}")
        self.method = method
        self.code = code
        self.details = details
