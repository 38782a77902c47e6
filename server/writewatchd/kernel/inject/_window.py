"""The compiled injection window (``_window.c``): how it is built, loaded, and called.

Built on first use by :mod:`.._compile` (a private cache, the source's hash in the name); when
it cannot be built or loaded, :func:`load` returns None and the injection runs the Python
window instead (same decisions, about 2x the stop time).

:class:`WindowState` mirrors ``struct ww_window``; the C functions return a
:class:`WindowResult` (``enum ww_result``), and :class:`WindowCall` (``enum ww_call``) names the
call that failed.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import logging
from pathlib import Path

from .._compile import compile_library

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


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled window, or None (logged once) when it cannot be built or loaded."""
    library = compile_library(_SOURCE, "injections use the slower Python window")
    if library is None:
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
