"""The one place where a domain error becomes a gRPC status.

:func:`abort` ends a call with the status of a domain exception: the code (from one table),
the message (cut short), and the error's reason (its class in UPPER_SNAKE, ``SESSION_ENDED``)
in the trailing metadata :data:`ERROR_REASON_KEY`, so clients tell errors apart without
reading messages. :func:`rpc` wraps a unary handler so that it never leaks a traceback, and
bytes that do not parse become a :class:`MalformedRequest`, answered INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from .._exceptions import (
    AccessDenied,
    AlreadyTracked,
    FeatureUnavailable,
    InjectionRefused,
    KernelError,
    LimitExceeded,
    NotRegistered,
    PolicyDenied,
    ProcessGone,
    RangeBusy,
    SessionEnded,
    SessionNotFound,
    UsageError,
    ViewNotFound,
    WriteWatchError,
)

__all__ = [
    "ERROR_REASONS",
    "ERROR_REASON_KEY",
    "MalformedRequest",
    "abort",
    "details",
    "request_parser",
    "rpc",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_STATUS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (SessionNotFound, grpc.StatusCode.NOT_FOUND),
    (ViewNotFound, grpc.StatusCode.NOT_FOUND),
    (ProcessGone, grpc.StatusCode.NOT_FOUND),
    (UsageError, grpc.StatusCode.INVALID_ARGUMENT),
    (AccessDenied, grpc.StatusCode.PERMISSION_DENIED),
    (PolicyDenied, grpc.StatusCode.PERMISSION_DENIED),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AlreadyTracked, grpc.StatusCode.ALREADY_EXISTS),
    (SessionEnded, grpc.StatusCode.FAILED_PRECONDITION),
    (InjectionRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (FeatureUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (RangeBusy, grpc.StatusCode.FAILED_PRECONDITION),
    (NotRegistered, grpc.StatusCode.FAILED_PRECONDITION),
    (KernelError, grpc.StatusCode.FAILED_PRECONDITION),
    (ImportError, grpc.StatusCode.UNIMPLEMENTED),
]


# Status details travel in a trailer; clients refuse trailers over 8 KiB by default and would
# see RESOURCE_EXHAUSTED instead of our status, so echoed request values are cut short.
_MAX_DETAILS_CHARS = 1024


def details(problem: object) -> str:
    text = str(problem)
    return text if len(text) <= _MAX_DETAILS_CHARS else text[: _MAX_DETAILS_CHARS - 1] + "…"


ERROR_REASON_KEY = "writewatch-error-reason"
"""Trailing metadata key of the reason behind a failed call's status."""


def _reason(cls: type[BaseException]) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).upper() if issubclass(cls, WriteWatchError) else ""


ERROR_REASONS = {_reason(cls): code for cls, code in _STATUS if _reason(cls)}
"""Every reason the service sends, with the status code it goes with."""


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code, _reason(cls)
    return grpc.StatusCode.INTERNAL, ""


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    """End the call with the status of a domain error: code, message and reason (the one mapping boundary)."""
    code, reason = _status_for(exc)
    await context.abort(code, details(exc), trailing_metadata=((ERROR_REASON_KEY, reason),) if reason else ())


def rpc(
    method: Callable[..., Awaitable[_T]],
) -> Callable[..., Awaitable[_T]]:
    """Map domain exceptions of a unary handler to a status with a precise message."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> _T:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details(request))
        try:
            return await method(self, request, context)
        except (WriteWatchError, ImportError) as exc:
            await abort(context, exc)
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL, details(f"{method.__name__} failed: {type(exc).__name__}: {exc}")
            )
        raise AssertionError("unreachable")

    return wrapper


class MalformedRequest:
    """Bytes that do not parse as the method's request message (answered INVALID_ARGUMENT).

    Parsing happens in gRPC's deserializer, whose failures gRPC itself would answer UNKNOWN;
    handing this marker to the handler keeps the status ours.
    """

    def __init__(self, type_name: str, error: DecodeError) -> None:
        self.message = f"the request is not a valid {type_name}: {error}"

    def __str__(self) -> str:
        return self.message


def request_parser(request_class: Any) -> Callable[[bytes], Any]:
    """gRPC's deserializer for ``request_class``: the message, or a :class:`MalformedRequest`."""

    def parse(data: bytes) -> Any:
        try:
            return request_class.FromString(data)
        except DecodeError as error:
            return MalformedRequest(request_class.DESCRIPTOR.full_name, error)

    return parse
