"""libc access through ctypes, and the one place where errno becomes an exception.

Foreign calls go through :data:`libc` (a ``CDLL``), so every call releases the GIL: a
thread pool running scans keeps an event loop responsive.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import platform
from collections.abc import Mapping
from typing import Any, NoReturn

from .._exceptions import (
    AccessDenied,
    FeatureUnavailable,
    KernelError,
    ProcessGone,
    RangeBusy,
)

__all__ = ["SYS", "check", "ioctl", "libc", "raise_errno", "retain_freed_memory", "syscall"]

libc = ctypes.CDLL(None, use_errno=True)

_ioctl = libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int

_syscall = libc.syscall
_syscall.restype = ctypes.c_long

_SYSCALL_NUMBERS: dict[str, dict[str, int]] = {
    "x86_64": {
        "userfaultfd": 323,
        "pidfd_open": 434,
        "pidfd_getfd": 438,
        "process_madvise": 440,
        "kcmp": 312,
    },
    "aarch64": {
        "userfaultfd": 282,
        "pidfd_open": 434,
        "pidfd_getfd": 438,
        "process_madvise": 440,
        "kcmp": 272,
    },
}
SYS: Mapping[str, int] = _SYSCALL_NUMBERS.get(platform.machine(), _SYSCALL_NUMBERS["x86_64"])

_DEFAULT_CLASSES: Mapping[int, type[KernelError]] = {
    _errno.ESRCH: ProcessGone,
    _errno.ENOENT: ProcessGone,
    _errno.EACCES: AccessDenied,
    _errno.EPERM: AccessDenied,
    _errno.ENOTTY: FeatureUnavailable,
    _errno.ENOSYS: FeatureUnavailable,
    _errno.EBUSY: RangeBusy,
}


def raise_errno(
    err: int,
    what: str,
    *,
    classes: Mapping[int, type[KernelError]] | None = None,
    hint: str = "",
    hints: Mapping[int, str] | None = None,
) -> NoReturn:
    """Raise the domain exception for ``err``.

    ``classes`` overrides the default class per errno; the message ends with ``hints[err]``
    when there is one, else with ``hint``.
    """
    cls = (classes or {}).get(err) or _DEFAULT_CLASSES.get(err, KernelError)
    message = f"{what}: {os.strerror(err)}"
    hint = (hints or {}).get(err, hint)
    if hint:
        message = f"{message} ({hint})"
    raise cls(err, message)


def check(
    result: int,
    what: str,
    *,
    classes: Mapping[int, type[KernelError]] | None = None,
    hint: str = "",
    hints: Mapping[int, str] | None = None,
) -> int:
    """``result`` of :func:`syscall`, :func:`ioctl` or alike when it is not an error, else raise.

    The -errno convention of the raw calls ends here: callers get a value or an exception.
    """
    if result < 0:
        raise_errno(-result, what, classes=classes, hint=hint, hints=hints)
    return result


def ioctl(fd: int, request: int, arg: Any) -> int:
    """ioctl(2); returns the result, or -errno (never raises)."""
    result = _ioctl(fd, request, arg)
    if result < 0:
        return -ctypes.get_errno()
    return int(result)


def syscall(number: int, *args: int) -> int:
    """syscall(2) with integer arguments; returns the result, or -errno (never raises)."""
    result = _syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    if result < 0:
        return -ctypes.get_errno()
    return int(result)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(threshold_bytes: int) -> bool:
    """Make glibc's malloc keep freed blocks below ``threshold_bytes`` for reuse; False without glibc.

    By default glibc serves a block of 128 KiB or more with a fresh mmap and unmaps it on free
    (the threshold adapts, but numpy temporaries of varying size keep defeating it), and trims
    the heap top above 128 KiB: every such block then page-faults and is zeroed again on its
    next use. Encoding a 131,072-region delta made ~6 MiB of such temporaries, and the faults
    cost ~7x the encoding itself (2.9 ms vs 0.37 ms on the development VM).
    """
    mallopt = getattr(libc, "mallopt", None)  # glibc only (absent on musl)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold_bytes))
