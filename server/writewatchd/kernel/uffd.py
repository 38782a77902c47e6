"""userfaultfd(2) for asynchronous write-protect tracking.

A userfaultfd acts on the memory of the process that *created* it. :meth:`Userfaultfd.create`
makes one for the calling process; :meth:`Userfaultfd.from_process` copies one that another
process created (``pidfd_getfd``), after which every ioctl here acts on that process.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import re

from .._exceptions import FeatureUnavailable, InvalidRange, ProcessGone, UsageError
from ._fd import OwnedFd
from ._libc import SYS, check, ioctl, syscall
from .pidfd import pidfd_getfd
from .procfs import read_status

__all__ = [
    "TRACKING_FEATURES",
    "RegisterMode",
    "UffdFeature",
    "Userfaultfd",
    "is_userfaultfd",
]

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
_UFFD_FEATURE_INITIALIZED = 1 << 31


class UffdFeature(enum.IntFlag):
    """``UFFD_FEATURE_*`` bits negotiated by ``UFFDIO_API``."""

    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16


#: What async write tracking asks for. No EVENT_* feature: nobody reads the fd, and an
#: event feature would make the target block until somebody did (docs/kernel.md §3.1).
TRACKING_FEATURES = UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED


class RegisterMode(enum.IntFlag):
    """``UFFDIO_REGISTER_MODE_*``."""

    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class _UffdioApi(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioRange(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _UffdioRegister(ctypes.Structure):
    _fields_ = [("range", _UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioWriteprotect(ctypes.Structure):
    _fields_ = [("range", _UffdioRange), ("mode", ctypes.c_uint64)]


def _iowr(nr: int, size_bytes: int) -> int:
    return (3 << 30) | (size_bytes << 16) | (0xAA << 8) | nr


def _ior(nr: int, size_bytes: int) -> int:
    return (2 << 30) | (size_bytes << 16) | (0xAA << 8) | nr


UFFDIO_API = _iowr(0x3F, ctypes.sizeof(_UffdioApi))
UFFDIO_REGISTER = _iowr(0x00, ctypes.sizeof(_UffdioRegister))
UFFDIO_UNREGISTER = _ior(0x01, ctypes.sizeof(_UffdioRange))
UFFDIO_WRITEPROTECT = _iowr(0x06, ctypes.sizeof(_UffdioWriteprotect))
_UFFDIO_WRITEPROTECT_MODE_WP = 1

_FDINFO_API = re.compile(r"^API:\s*([0-9a-f]+):([0-9a-f]+):([0-9a-f]+)", re.MULTILINE)


def is_userfaultfd(pid: int, fd: int) -> bool:
    """Whether fd ``fd`` of process ``pid`` is a userfaultfd."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False


def _check_span(start: int, length_bytes: int) -> None:
    page_size_bytes = os.sysconf("SC_PAGE_SIZE")
    if start % page_size_bytes or length_bytes % page_size_bytes:
        raise InvalidRange(f"[0x{start:x}, +{length_bytes}) is not page aligned")
    if length_bytes <= 0:
        raise InvalidRange(f"length_bytes must be > 0, got {length_bytes}")


class Userfaultfd(OwnedFd):
    """A userfaultfd context, owned by this object (closed by :meth:`close`).

    Closing the last reference unregisters every range of the context and clears its
    write-protect bits; the tracked process sees nothing.
    """

    def __init__(self, fd: int, *, owner_pid: int | None = None) -> None:
        self._fd = fd
        self.owner_pid = os.getpid() if owner_pid is None else owner_pid
        self.features = UffdFeature(0)

    @classmethod
    def create(cls, *, user_mode_only: bool | None = None) -> Userfaultfd:
        """A new userfaultfd for the calling process (``O_CLOEXEC | O_NONBLOCK``).

        ``user_mode_only`` defaults to "when unprivileged": it is harmless for WP_ASYNC,
        whose faults are resolved in the kernel, and required when
        ``vm.unprivileged_userfaultfd`` is 0 and we lack CAP_SYS_PTRACE.
        """
        if user_mode_only is None:
            user_mode_only = os.geteuid() != 0
        flags = os.O_CLOEXEC | os.O_NONBLOCK | (UFFD_USER_MODE_ONLY if user_mode_only else 0)
        fd = check(
            syscall(SYS["userfaultfd"], flags),
            "userfaultfd()",
            hints={errno.EPERM: "vm.unprivileged_userfaultfd=0 needs CAP_SYS_PTRACE or UFFD_USER_MODE_ONLY"},
        )
        return cls(fd)

    @classmethod
    def from_process(cls, pid: int, target_fd: int) -> Userfaultfd:
        """Copy fd ``target_fd`` of ``pid``, which must be a userfaultfd that ``pid`` created."""
        if not is_userfaultfd(pid, target_fd):
            if not os.path.exists(f"/proc/{pid}"):
                pidfd_getfd(pid, target_fd)  # raises ProcessGone with the kernel's word
            if read_status(pid).state in ("Z", "X"):  # exited: its fds are closed, not wrong
                raise ProcessGone(errno.ESRCH, f"process {pid} has exited")
            raise UsageError(f"fd {target_fd} of pid {pid} is not a userfaultfd")
        uffd = cls(pidfd_getfd(pid, target_fd), owner_pid=pid)
        uffd.features = uffd._features_from_fdinfo()
        return uffd

    @property
    def initialized(self) -> bool:
        """Whether the ``UFFDIO_API`` handshake has happened (by us or by the creator)."""
        return bool(self._read_fdinfo_features() & _UFFD_FEATURE_INITIALIZED)

    def api(self, features: UffdFeature = TRACKING_FEATURES) -> UffdFeature:
        """The ``UFFDIO_API`` handshake, once per context; returns the features in force.

        When the context was already initialized (e.g. by a cooperating target), the
        features are read back instead, and must include ``features``.
        """
        if self.initialized:
            current = self._features_from_fdinfo()
            missing = features & ~current
            if missing:
                raise FeatureUnavailable(
                    errno.EINVAL,
                    f"userfaultfd was initialized without {missing!r}; "
                    "create it without calling UFFDIO_API, or with WP_ASYNC",
                )
            self.features = current
            return current
        arg = _UffdioApi(api=UFFD_API, features=int(features))
        check(
            ioctl(self._fd, UFFDIO_API, ctypes.byref(arg)),
            f"UFFDIO_API(features={features!r})",
            classes={errno.EINVAL: FeatureUnavailable},
            hints={errno.EINVAL: "this kernel lacks an asked-for userfaultfd feature"},
        )
        # The kernel writes back everything it supports, not what it enabled; fdinfo has the
        # context's real feature set.
        self.features = self._features_from_fdinfo()
        return self.features

    @staticmethod
    def supported_features() -> UffdFeature:
        """The features this kernel offers (a throw-away handshake asking for none)."""
        probe = Userfaultfd.create(user_mode_only=True)
        try:
            arg = _UffdioApi(api=UFFD_API, features=0)
            check(ioctl(probe.fileno(), UFFDIO_API, ctypes.byref(arg)), "UFFDIO_API probe")
            return UffdFeature(arg.features & ~_UFFD_FEATURE_INITIALIZED)
        finally:
            probe.close()

    def register(self, start: int, length_bytes: int, mode: RegisterMode = RegisterMode.WP) -> None:
        """Register ``[start, start + length_bytes)`` of the owner's memory."""
        _check_span(start, length_bytes)
        arg = _UffdioRegister(range=_UffdioRange(start, length_bytes), mode=int(mode))
        check(
            ioctl(self._fd, UFFDIO_REGISTER, ctypes.byref(arg)),
            f"UFFDIO_REGISTER [0x{start:x}, +{length_bytes}) of pid {self.owner_pid}",
            hints=_REGISTER_HINTS,
        )

    def unregister(self, start: int, length_bytes: int) -> None:
        """Unregister the range; also clears its write-protect bits."""
        _check_span(start, length_bytes)
        arg = _UffdioRange(start, length_bytes)
        check(
            ioctl(self._fd, UFFDIO_UNREGISTER, ctypes.byref(arg)),
            f"UFFDIO_UNREGISTER [0x{start:x}, +{length_bytes}) of pid {self.owner_pid}",
        )

    def write_protect(self, start: int, length_bytes: int, *, protect: bool = True) -> None:
        """Write-protect the range (``protect=False`` removes the protection: pages read as written)."""
        _check_span(start, length_bytes)
        arg = _UffdioWriteprotect(
            range=_UffdioRange(start, length_bytes),
            mode=_UFFDIO_WRITEPROTECT_MODE_WP if protect else 0,
        )
        check(
            ioctl(self._fd, UFFDIO_WRITEPROTECT, ctypes.byref(arg)),
            f"UFFDIO_WRITEPROTECT [0x{start:x}, +{length_bytes}) of pid {self.owner_pid}",
        )

    def _read_fdinfo_features(self) -> int:
        with open(f"/proc/self/fdinfo/{self._fd}") as f:
            match = _FDINFO_API.search(f.read())
        return int(match.group(2), 16) if match else 0

    def _features_from_fdinfo(self) -> UffdFeature:
        return UffdFeature(self._read_fdinfo_features() & ~_UFFD_FEATURE_INITIALIZED)


_REGISTER_HINTS = {
    errno.EBUSY: "another userfaultfd already tracks this memory",
    errno.EINVAL: "the range must be mapped, page aligned (huge-page aligned for hugetlb), and the handshake done",
    errno.EPERM: "the mapping cannot be written (no VM_MAYWRITE)",
    errno.ENOMEM: "part of the range is not mapped",
}
