"""The compiled injection window (``_window.c``): how it is built, loaded, and called.

Build decision: compiled on first use, not at install time. The helper process compiles
``_window.c`` with ``$CC`` (default ``cc``) into ``$WRITEWATCHD_CACHE_DIR`` (default
``$XDG_CACHE_HOME/writewatchd``, else ``~/.cache/writewatchd``) under a name that carries the
hash of the source and the compiler command, so an edited source is rebuilt and an old
build is never loaded by mistake. It needs no build step in the package (an editable
install just works) and costs one compilation of about 0.2 s per source change. The helper
runs as root and loads code from that directory, so the directory must be owned by us and
writable by nobody else, and so must the library; otherwise, or without a compiler, or if
the compilation fails, :func:`load` logs one warning and returns None, and the injection
runs the Python window instead (same decisions, about 2x the stop time).

:class:`WindowState` mirrors ``struct ww_window``; the C functions return a
:class:`WindowResult` (``enum ww_result``), and :class:`WindowCall` (``enum ww_call``) names the
call that failed.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import hashlib
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

__all__ = [
    "WW_MAX_HELD",
    "WindowCall",
    "WindowResult",
    "WindowState",
    "load",
]

_log = logging.getLogger(__name__)


class WindowResult(enum.IntEnum):
    """``enum ww_result``: what a call of the compiled window answers."""

    OK = 0
    #: A call failed: :attr:`WindowState.failed_call` and ``failed_errno`` say which and how.
    ERROR = 1
    #: The thread exited or was killed (its wait status is in :attr:`WindowState.status`).
    GONE = 2
    #: The stop deadline passed before the thread stopped.
    TIMEOUT = 3
    #: An injected syscall did not finish within the step limit.
    STUCK = 4


class WindowCall(enum.IntEnum):
    """``enum ww_call``: the ptrace request (or other call) that failed."""

    NOTHING = 0
    PTRACE_INTERRUPT = 1
    WAITPID = 2
    PTRACE_GETREGS = 3
    PTRACE_SETREGS = 4
    PTRACE_SETOPTIONS = 5
    PTRACE_GET_RSEQ_CONFIGURATION = 6
    PTRACE_SINGLESTEP = 7
    PTRACE_GETSIGINFO = 8
    PTRACE_SETSIGINFO = 9
    PTRACE_DETACH = 10
    MEM_WRITE = 11

    def describe(self) -> str:
        """The call as an error message names it."""
        return {WindowCall.WAITPID: "waitpid", WindowCall.MEM_WRITE: "write to /proc/PID/mem"}.get(self, self.name)


WW_MAX_HELD = 64
_N_REGS = 27
_MAX_EINTR_PRONE = 31

_SOURCE = Path(__file__).with_name("_window.c")
_CFLAGS = ("-O2", "-shared", "-fPIC", "-Wall", "-Werror")


class WindowState(ctypes.Structure):
    """``struct ww_window`` of ``_window.c``: inputs, then state and results."""

    _fields_ = [
        ("pid", ctypes.c_int32),
        ("tid", ctypes.c_int32),
        ("pidfd", ctypes.c_int32),
        ("mem_fd", ctypes.c_int32),
        ("gadget", ctypes.c_uint64),
        ("uffd_flags", ctypes.c_uint64),
        ("stop_deadline_ns", ctypes.c_int64),
        ("step_limit_ns", ctypes.c_int64),
        ("pause_ns", ctypes.c_int64),
        ("n_eintr_prone", ctypes.c_int32),
        ("eintr_prone", ctypes.c_int32 * _MAX_EINTR_PRONE),
        ("status", ctypes.c_int32),
        ("stopped", ctypes.c_int32),
        ("armed", ctypes.c_int32),
        ("target_fd", ctypes.c_int32),
        ("stolen_fd", ctypes.c_int32),
        ("close_result", ctypes.c_int32),
        ("failed_call", ctypes.c_int32),
        ("failed_errno", ctypes.c_int32),
        ("n_held", ctypes.c_int32),
        ("held", ctypes.c_int32 * WW_MAX_HELD),
        ("first_siginfo", ctypes.c_uint8 * 128),
        ("interrupt_ns", ctypes.c_int64),
        ("detach_ns", ctypes.c_int64),
        ("saved", ctypes.c_uint64 * _N_REGS),
        ("restored", ctypes.c_uint64 * _N_REGS),
    ]

    def set_eintr_prone(self, numbers: frozenset[int]) -> None:
        """The syscalls whose ``-EINTR`` caused by our interrupt is turned into a restart."""
        ordered = sorted(numbers)
        if len(ordered) > _MAX_EINTR_PRONE:
            raise ValueError(f"at most {_MAX_EINTR_PRONE} EINTR-prone syscalls fit in struct ww_window")
        self.n_eintr_prone = len(ordered)
        for index, nr in enumerate(ordered):
            self.eintr_prone[index] = nr


def _cache_dir() -> Path:
    configured = os.environ.get("WRITEWATCHD_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "writewatchd"


def _private(path: Path) -> bool:
    """Owned by us and writable by nobody else: safe to load code from."""
    info = path.stat()
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _build(compiler: str) -> Path:
    """The compiled library, built if this source and command have not been built before."""
    command = (compiler, *_CFLAGS)
    digest = hashlib.sha256(_SOURCE.read_bytes() + "\0".join(command).encode()).hexdigest()[:16]
    directory = _cache_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _private(directory):
        raise PermissionError(f"{directory} is writable by others or not ours; not loading code from it")
    library = directory / f"_window-{digest}.so"
    if not library.exists():
        partial = library.with_suffix(f".tmp{os.getpid()}")
        _log.info("compiling the injection window: %s", " ".join((*command, "-o", str(library), str(_SOURCE))))
        subprocess.run([*command, "-o", str(partial), str(_SOURCE)], check=True, capture_output=True, timeout=60)
        partial.rename(library)
    if not _private(library):
        raise PermissionError(f"{library} is writable by others or not ours; not loading it")
    return library


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled window, or None (logged once) when it cannot be built or loaded."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        _log.warning("no C compiler (%s): injections use the slower Python window", compiler)
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)), use_errno=True)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = exc.stderr.decode(errors="replace") if isinstance(exc, subprocess.CalledProcessError) else ""
        _log.warning("cannot build the injection window (%s%s): injections use the slower Python window", exc, detail)
        return None
    library.ww_size.restype = ctypes.c_size_t
    if library.ww_size() != ctypes.sizeof(WindowState):
        _log.warning("the injection window's struct does not match its mirror: injections use the Python window")
        return None
    for name in ("ww_stop", "ww_save", "ww_steal", "ww_release"):
        function = getattr(library, name)
        function.argtypes = [ctypes.POINTER(WindowState)]
        function.restype = ctypes.c_int
    return library
