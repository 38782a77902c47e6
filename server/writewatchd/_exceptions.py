"""The exception vocabulary of writewatchd.

Every error the package raises on purpose is one of these::

    WriteWatchError                     base of everything below
    ├── UsageError (ValueError)         the caller passed arguments that can never work
    │   └── InvalidRange                an address range is unaligned, empty, or outside what is allowed
    ├── SessionNotFound (LookupError)   no session has that id
    ├── ViewNotFound (LookupError)      the session has no view of that name
    ├── SessionEnded                    the session has ended; it can be read, not changed
    ├── PolicyDenied                    the caller's identity may not touch this target (its policy)
    ├── LimitExceeded                   a configured limit (sessions, ranges, subscribers) would be exceeded
    ├── AlreadyTracked                  the process already has an active session
    └── KernelError (OSError)           a kernel interface refused; carries ``errno``
        ├── FeatureUnavailable          this kernel lacks an interface, flag or category
        ├── NotRegistered               memory in the range is not registered for async write-protect
        ├── RangeBusy                   another userfaultfd already tracks the range
        ├── ProcessGone                 the target process no longer exists
        ├── AccessDenied                the caller may not inspect or control the target
        └── InjectionRefused            injection was refused before the target was touched

errno is turned into these at one boundary, :func:`writewatchd.kernel._libc.raise_errno`
(and ``check``, for the raw calls' -errno results); callers choose classes and hints per
errno there. Two readers remain outside it, on purpose: PAGEMAP_SCAN's own mapping, whose
EINVAL and EFAULT mean a usage error or a missing feature depending on the arguments, and
the probe, which reports ENOTTY as a missing interface.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "AlreadyTracked",
    "LimitExceeded",
    "SessionEnded",
    "SessionNotFound",
    "FeatureUnavailable",
    "InjectionRefused",
    "InvalidRange",
    "KernelError",
    "NotRegistered",
    "PolicyDenied",
    "ProcessGone",
    "RangeBusy",
    "UsageError",
    "ViewNotFound",
    "WriteWatchError",
]


class WriteWatchError(Exception):
    """Base class of every error writewatchd raises on purpose."""


class UsageError(WriteWatchError, ValueError):
    """The caller passed arguments that can never work."""


class InvalidRange(UsageError):
    """An address range is unaligned, empty, or outside what is allowed."""


class SessionNotFound(WriteWatchError, LookupError):
    """No session has that id."""


class ViewNotFound(WriteWatchError, LookupError):
    """The session has no view of that name."""


class SessionEnded(WriteWatchError):
    """The session has ended; it can be read, not changed."""


class PolicyDenied(WriteWatchError):
    """The caller's identity may not do this (its target policy); the message names the rule."""


class LimitExceeded(WriteWatchError):
    """A configured limit (sessions, ranges, subscribers) would be exceeded."""


class AlreadyTracked(WriteWatchError):
    """The process already has an active session (one per process: a second would compete for its dirty bits)."""


class KernelError(WriteWatchError, OSError):
    """A kernel interface refused the request; ``errno`` says how."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(errno, message)

    def __str__(self) -> str:
        return str(self.strerror)


class FeatureUnavailable(KernelError):
    """This kernel lacks the interface, flag or category that was asked for."""


class NotRegistered(KernelError):
    """Memory in the range is not registered for async write-protect (userfaultfd WP_ASYNC)."""


class RangeBusy(KernelError):
    """Another userfaultfd context already tracks memory in the range."""


class ProcessGone(KernelError):
    """The target process has exited (or its pid now names another process)."""


class AccessDenied(KernelError):
    """The caller lacks the permission to inspect or control the target."""


class InjectionRefused(KernelError):
    """Injection into the target was refused before anything in the target changed."""
