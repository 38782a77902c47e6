"""Exceptions of the writewatch client.

WriteWatchError
 ├── ProtocolError
 ├── RecordingError
 │    └── RecordingVersionError
 └── RpcError
      ├── Cancelled
      ├── Unknown
      ├── InvalidArgument
      │    └── UsageError (ValueError)
      ├── DeadlineExceeded
      ├── NotFound
      ├── AlreadyExists
      ├── PermissionDenied
      ├── ResourceExhausted
      ├── FailedPrecondition
      │    ├── SessionEnded
      │    └── InjectionRefused
      ├── Aborted
      ├── OutOfRange
      ├── Unimplemented
      ├── Internal
      ├── Unavailable
      ├── DataLoss
      └── Unauthenticated

A call's error class comes from its status code, refined by the reason the daemon names in
the trailing metadata ``writewatch-error-reason`` (``SESSION_ENDED``...), never from the
message text; :attr:`RpcError.reason` keeps that reason for the errors without a class of
their own.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "ERRORS_BY_REASON",
    "ERROR_REASON_KEY",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InjectionRefused",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ProtocolError",
    "RecordingError",
    "RecordingVersionError",
    "ResourceExhausted",
    "RpcError",
    "SessionEnded",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "UsageError",
    "WriteWatchError",
    "from_grpc_error",
    "rpc_error",
]


class WriteWatchError(Exception):
    """Base class of every error raised by the writewatch client."""


class ProtocolError(WriteWatchError):
    """The daemon sent a message that breaks the writewatch protocol."""


class RecordingError(WriteWatchError):
    """A file is not a writewatch recording, or is corrupt (see docs/recording.md)."""


class RecordingVersionError(RecordingError):
    """A recording of a newer format version than this client reads; ``version`` says which."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version


class RpcError(WriteWatchError):
    """A call failed with a gRPC status; ``code`` and ``message`` say which and why, ``reason``
    names the daemon's error (``SESSION_ENDED``...; empty when it named none)."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message
        self.reason = reason


class Cancelled(RpcError):
    """The call was cancelled."""


class Unknown(RpcError):
    """The daemon failed with an unknown error."""


class InvalidArgument(RpcError):
    """The request is malformed (unaligned or overlapping ranges, bad values)."""


class UsageError(InvalidArgument, ValueError):
    """Arguments that can never work (reason ``USAGE_ERROR``); also a ValueError."""


class DeadlineExceeded(RpcError):
    """The call did not complete before its deadline."""


class NotFound(RpcError):
    """The session, process or view does not exist."""


class AlreadyExists(RpcError):
    """The resource already exists (for example, the process is already tracked)."""


class PermissionDenied(RpcError):
    """The caller may not do this, or the daemon may not act on the target."""


class ResourceExhausted(RpcError):
    """A daemon limit (sessions, ranges, subscribers, message size) was reached."""


class FailedPrecondition(RpcError):
    """The system is not in a state that allows the call (session ended, kernel lacks a feature)."""


class SessionEnded(FailedPrecondition):
    """The session has ended: it can be read, not changed (reason ``SESSION_ENDED``)."""


class InjectionRefused(FailedPrecondition):
    """Injection was refused before the target was touched (reason ``INJECTION_REFUSED``)."""


class Aborted(RpcError):
    """The call was aborted by a concurrent change."""


class OutOfRange(RpcError):
    """A value is outside the valid range."""


class Unimplemented(RpcError):
    """The daemon does not implement this call."""


class Internal(RpcError):
    """The daemon hit an internal error."""


class Unavailable(RpcError):
    """The daemon cannot be reached or is shutting down; retrying may succeed."""


class DataLoss(RpcError):
    """Unrecoverable data loss or corruption."""


class Unauthenticated(RpcError):
    """The caller's credentials are missing or invalid."""


_BY_CODE: dict[grpc.StatusCode, type[RpcError]] = {
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNKNOWN: Unknown,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


ERROR_REASON_KEY = "writewatch-error-reason"
"""Trailing metadata key of the reason behind a failed call's status."""

ERRORS_BY_REASON: dict[str, type[RpcError]] = {
    "SESSION_ENDED": SessionEnded,
    "INJECTION_REFUSED": InjectionRefused,
    "USAGE_ERROR": UsageError,
}
"""The reasons with a class of their own."""


def rpc_error(code: grpc.StatusCode, message: str, reason: str = "") -> RpcError:
    """The RpcError subclass instance for a status code and the daemon's reason."""
    by_code = _BY_CODE.get(code, RpcError)
    by_reason = ERRORS_BY_REASON.get(reason)
    cls = by_reason if by_reason is not None and issubclass(by_reason, by_code) else by_code
    return cls(code, message, reason)


def from_grpc_error(error: grpc.RpcError) -> RpcError:
    """Convert a grpc (sync or aio) call error to the matching RpcError."""
    # Every RpcError raised by a call is also a grpc.Call / aio.AioRpcError carrying these.
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    # (key, value) pairs: namedtuples from a blocking call, tuples from an asyncio one.
    trailing: Iterable[Any] = (error.trailing_metadata() if hasattr(error, "trailing_metadata") else None) or ()
    reason = next((str(pair[1]) for pair in trailing if pair[0] == ERROR_REASON_KEY), "")
    return rpc_error(code, details or "", reason)
