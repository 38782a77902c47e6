"""writewatchd: page-exact write tracking of Linux processes, and the daemon that streams it."""

from ._exceptions import (
    AccessDenied,
    AlreadyTracked,
    FeatureUnavailable,
    InjectionRefused,
    InvalidRange,
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

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "AlreadyTracked",
    "FeatureUnavailable",
    "InjectionRefused",
    "InvalidRange",
    "KernelError",
    "LimitExceeded",
    "NotRegistered",
    "PolicyDenied",
    "ProcessGone",
    "RangeBusy",
    "SessionEnded",
    "SessionNotFound",
    "UsageError",
    "ViewNotFound",
    "WriteWatchError",
    "__version__",
]
