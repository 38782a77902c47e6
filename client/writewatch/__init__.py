"""writewatch: client library and CLI for writewatchd.

>>> import writewatch
>>> with writewatch.Client() as client:  # doctest: +SKIP
...     session = client.spawn(["./prog"], ranges="auto")
...     for delta in session.subscribe():
...         print(delta.seq, delta.regions)
"""

from ._address import default_address
from ._async_client import AsyncClient, AsyncSession, AsyncView
from ._client import Client, Session, View
from ._exceptions import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InjectionRefused,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ProtocolError,
    RecordingError,
    RecordingVersionError,
    ResourceExhausted,
    RpcError,
    SessionEnded,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    UsageError,
    WriteWatchError,
)
from ._proto.writewatch.v1 import writewatch_pb2 as pb
from ._types import AttachMode, Delta, EndReason, PageCategory, RetryPolicy, ScanResult, WriteWatchResult
from ._wire import FragmentAssembler, decode_delta
from .fleet import Fleet, FleetError
from .recording import Recording, RecordingTruncatedWarning, read_recording
from .regions import decode_regions, encode_regions, split_regions

__version__ = "0.1.0"

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "AsyncSession",
    "AsyncView",
    "AttachMode",
    "Cancelled",
    "Client",
    "DataLoss",
    "DeadlineExceeded",
    "Delta",
    "EndReason",
    "Fleet",
    "FleetError",
    "FragmentAssembler",
    "FailedPrecondition",
    "InjectionRefused",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PageCategory",
    "PermissionDenied",
    "ProtocolError",
    "Recording",
    "RecordingError",
    "RecordingTruncatedWarning",
    "RecordingVersionError",
    "ResourceExhausted",
    "RetryPolicy",
    "RpcError",
    "ScanResult",
    "Session",
    "SessionEnded",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "UsageError",
    "View",
    "WriteWatchError",
    "WriteWatchResult",
    "__version__",
    "decode_delta",
    "decode_regions",
    "default_address",
    "encode_regions",
    "pb",
    "read_recording",
    "split_regions",
]
