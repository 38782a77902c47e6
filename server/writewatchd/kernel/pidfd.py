"""pidfd_open(2) and pidfd_getfd(2): a handle on one process, and copies of its file descriptors."""

from __future__ import annotations

import errno
import os
import select

from .._exceptions import AccessDenied, ProcessGone
from ._libc import SYS, check, syscall

__all__ = ["ProcessHandle", "check_getfd", "pidfd_getfd", "pidfd_open"]


def pidfd_open(pid: int) -> int:
    """A pidfd for ``pid`` (close it with ``os.close``)."""
    return check(syscall(SYS["pidfd_open"], pid, 0), f"pidfd_open({pid})", classes={errno.EINVAL: ProcessGone})


def pidfd_getfd(pid: int, target_fd: int, *, pidfd: int | None = None) -> int:
    """A duplicate, in this process, of file descriptor ``target_fd`` of process ``pid``.

    ``pidfd``, when given, is an open pidfd of ``pid`` to use (else one is opened and
    closed). Needs PTRACE_MODE_ATTACH_REALCREDS access to the target. The copy is
    close-on-exec.
    """
    if pidfd is not None:
        return check_getfd(syscall(SYS["pidfd_getfd"], pidfd, target_fd, 0), pid=pid, target_fd=target_fd)
    own = pidfd_open(pid)
    try:
        fd = syscall(SYS["pidfd_getfd"], own, target_fd, 0)
    finally:
        os.close(own)
    return check_getfd(fd, pid=pid, target_fd=target_fd)


def check_getfd(result: int, *, pid: int, target_fd: int) -> int:
    """The fd a ``pidfd_getfd`` call answered (made here or by the compiled window), else raise."""
    return check(
        result,
        f"pidfd_getfd(pid {pid}, fd {target_fd})",
        classes={errno.EPERM: AccessDenied},
        hints={errno.EBADF: "the target has no such fd"},
    )


class ProcessHandle:
    """A pidfd held for a process's whole tracking: it never follows a recycled pid.

    Kernel builds disagree on what a scan of an exited process answers (``ESRCH``, or no
    regions at all: docs/kernel.md §8.1), so the exit of a target is learnt here, from the
    pidfd turning readable, and never from a scan.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = pidfd_open(pid)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    def fileno(self) -> int:
        """The pidfd (readable once the process has exited, zombie or reaped)."""
        return self._fd

    def has_exited(self) -> bool:
        """Whether the process has exited (or this handle was closed); never blocks."""
        return self._fd < 0 or bool(self._poll.poll(0))

    def wait_exited(self, timeout_s: float) -> bool:
        """Whether the process exits within ``timeout_s`` (blocks up to that long)."""
        return self._fd < 0 or bool(self._poll.poll(max(0, round(timeout_s * 1000))))

    def close(self) -> None:
        """Close the pidfd; idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
