"""pidfd_open(2) and pidfd_getfd(2): copy a file descriptor out of another process."""

from __future__ import annotations

import errno
import os

from .._exceptions import AccessDenied, ProcessGone
from ._libc import SYS, raise_errno, syscall

__all__ = ["pidfd_getfd", "pidfd_open"]


def pidfd_open(pid: int) -> int:
    """A pidfd for ``pid`` (close it with ``os.close``)."""
    fd = syscall(SYS["pidfd_open"], pid, 0)
    if fd < 0:
        raise_errno(-fd, f"pidfd_open({pid})", classes={errno.EINVAL: ProcessGone})
    return fd


def pidfd_getfd(pid: int, target_fd: int) -> int:
    """A duplicate, in this process, of file descriptor ``target_fd`` of process ``pid``.

    Needs PTRACE_MODE_ATTACH_REALCREDS access to the target. The copy is close-on-exec.
    """
    pidfd = pidfd_open(pid)
    try:
        fd = syscall(SYS["pidfd_getfd"], pidfd, target_fd, 0)
    finally:
        os.close(pidfd)
    if fd < 0:
        raise_errno(
            -fd,
            f"pidfd_getfd(pid {pid}, fd {target_fd})",
            classes={errno.EPERM: AccessDenied},
            hint="the target has no such fd" if -fd == errno.EBADF else "",
        )
    return fd
