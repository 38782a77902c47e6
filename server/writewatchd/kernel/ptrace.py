"""ptrace(2) and waitpid(2) through ctypes, for x86_64.

Only what single-syscall injection needs: seize/interrupt/detach, register access,
single-stepping, siginfo, options, the rseq configuration, and a deadline-bounded wait for
a tracee stop. Every wrapper raises a domain exception through ``_libc.raise_errno``.

ptrace requests are bound to the *thread* that attached: all calls for one tracee must be
made from the same OS thread.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import signal
import time
from dataclasses import dataclass

from .._exceptions import FeatureUnavailable, ProcessGone
from ._libc import check, libc

__all__ = [
    "SIGINFO_SIZE",
    "PtraceEvent",
    "PtraceOption",
    "RseqConfig",
    "UserRegs",
    "WaitStatus",
    "detach",
    "get_rseq_configuration",
    "getregs",
    "getsiginfo",
    "interrupt",
    "ptrace_raw",
    "reap_dead_tracee",
    "require_x86_64",
    "resume",
    "seize",
    "setoptions",
    "setregs",
    "setsiginfo",
    "singlestep",
    "wait_stop",
]

PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETSIGINFO = 0x4202
PTRACE_SETSIGINFO = 0x4203
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F

WALL = 0x40000000  # __WALL: wait for threads as well as processes
SIGINFO_SIZE = 128

# Waiting: a few yields let a tracee on another CPU reach its stop cheaply; longer spinning
# starves the tracee on a 2-CPU machine (docs/injection.md §2). Then sleep: until the SIGCHLD that
# every ptrace stop sends the tracer when the calling thread blocks SIGCHLD (one sent
# before the sleep stays pending, so none is missed; the sleep is capped in case another
# thread takes it), else briefly. Measured on the Python window, sleeping at once in
# sigtimedwait was about 40 µs slower (median) than yielding first.
_SPIN_YIELDS = 50
_SIGCHLD_WAIT_CAP_S = 0.001
_SLEEP_S = 20e-6


class PtraceOption(enum.IntFlag):
    """``PTRACE_O_*`` options."""

    TRACESYSGOOD = 1
    TRACEFORK = 1 << 1
    TRACEVFORK = 1 << 2
    TRACECLONE = 1 << 3
    TRACEEXEC = 1 << 4
    TRACEVFORKDONE = 1 << 5
    TRACEEXIT = 1 << 6
    TRACESECCOMP = 1 << 7
    EXITKILL = 1 << 20
    SUSPEND_SECCOMP = 1 << 21


class PtraceEvent(enum.IntEnum):
    """``PTRACE_EVENT_*`` codes, found in ``status >> 16`` of a stop."""

    NONE = 0
    FORK = 1
    VFORK = 2
    CLONE = 3
    EXEC = 4
    VFORK_DONE = 5
    EXIT = 6
    SECCOMP = 7
    STOP = 128


_REGISTER_NAMES = (
    *("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi"),
    *("rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs"),
)


class UserRegs(ctypes.Structure):
    """``struct user_regs_struct`` of x86_64 (27 unsigned longs)."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in _REGISTER_NAMES]

    def copy(self) -> UserRegs:
        """An independent copy."""
        return UserRegs.from_buffer_copy(self)

    @property
    def rax_signed(self) -> int:
        """``rax`` as the signed syscall return value."""
        return ctypes.c_longlong(self.rax).value

    @property
    def orig_rax_signed(self) -> int:
        """``orig_rax`` as signed: the syscall number, or -1 outside a syscall."""
        return ctypes.c_longlong(self.orig_rax).value


class _RseqConfiguration(ctypes.Structure):
    _fields_ = [
        ("rseq_abi_pointer", ctypes.c_uint64),
        ("rseq_abi_size", ctypes.c_uint32),
        ("signature", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


@dataclass(frozen=True, slots=True)
class RseqConfig:
    """A thread's registered ``struct rseq``: its address and the abort-handler signature."""

    rseq_abi_pointer: int
    signature: int


@dataclass(frozen=True, slots=True)
class WaitStatus:
    """A decoded ``waitpid`` status of a tracee."""

    raw: int

    @property
    def stopped(self) -> bool:
        """A ptrace stop (the tracee waits for us)."""
        return os.WIFSTOPPED(self.raw)

    @property
    def gone(self) -> bool:
        """The tracee exited or was killed."""
        return os.WIFEXITED(self.raw) or os.WIFSIGNALED(self.raw)

    @property
    def stop_signal(self) -> int:
        """The signal of a stop (SIGTRAP for event stops of an interrupt or a step)."""
        return os.WSTOPSIG(self.raw) if self.stopped else 0

    @property
    def event(self) -> PtraceEvent:
        """The ``PTRACE_EVENT_*`` of a stop; NONE for a signal-delivery-stop."""
        return PtraceEvent((self.raw >> 16) & 0xFFFF) if self.stopped else PtraceEvent.NONE

    @property
    def is_group_stop(self) -> bool:
        """A group-stop reported to a seizing tracer (event STOP with a stop signal)."""
        return self.event == PtraceEvent.STOP and self.stop_signal != signal.SIGTRAP

    def describe(self) -> str:
        """Human-readable status, for error messages."""
        if os.WIFEXITED(self.raw):
            return f"exited with status {os.WEXITSTATUS(self.raw)}"
        if os.WIFSIGNALED(self.raw):
            return f"killed by {signal.Signals(os.WTERMSIG(self.raw)).name}"
        return f"stopped by signal {self.stop_signal}, event {self.event.value}"


_ptrace = libc.ptrace
_ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_ptrace.restype = ctypes.c_long


def ptrace_raw(request: int, tid: int, addr: int | None = None, data: object = None) -> int:
    """ptrace(2); returns the result, or -errno (never raises).

    ``data`` may be an integer or a ctypes ``byref``/pointer.
    """
    ctypes.set_errno(0)
    result = _ptrace(request, tid, addr, data)
    if result == -1:
        err = ctypes.get_errno()
        if err:
            return -err
    return int(result)


def _check(result: int, what: str, tid: int) -> int:
    return check(result, f"{what} of thread {tid}")


def seize(tid: int, options: PtraceOption | int = 0) -> None:
    """``PTRACE_SEIZE``: trace ``tid`` without stopping it or sending it a signal."""
    _check(ptrace_raw(PTRACE_SEIZE, tid, 0, int(options)), "PTRACE_SEIZE", tid)


def interrupt(tid: int) -> None:
    """``PTRACE_INTERRUPT``: ask a seized thread for a ``PTRACE_EVENT_STOP``."""
    _check(ptrace_raw(PTRACE_INTERRUPT, tid, 0, 0), "PTRACE_INTERRUPT", tid)


def setoptions(tid: int, options: PtraceOption) -> None:
    """``PTRACE_SETOPTIONS`` (replaces the option set)."""
    _check(ptrace_raw(PTRACE_SETOPTIONS, tid, 0, int(options)), "PTRACE_SETOPTIONS", tid)


def getregs(tid: int) -> UserRegs:
    """The general registers of a stopped tracee."""
    regs = UserRegs()
    _check(ptrace_raw(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs)), "PTRACE_GETREGS", tid)
    return regs


def setregs(tid: int, regs: UserRegs) -> None:
    """Set the general registers of a stopped tracee."""
    _check(ptrace_raw(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs)), "PTRACE_SETREGS", tid)


def singlestep(tid: int, sig: int = 0) -> None:
    """Resume for one instruction, delivering ``sig`` (0: none)."""
    _check(ptrace_raw(PTRACE_SINGLESTEP, tid, 0, sig), "PTRACE_SINGLESTEP", tid)


def resume(tid: int, sig: int = 0) -> None:
    """``PTRACE_CONT``, delivering ``sig`` (0: none)."""
    _check(ptrace_raw(PTRACE_CONT, tid, 0, sig), "PTRACE_CONT", tid)


def detach(tid: int, sig: int = 0) -> None:
    """``PTRACE_DETACH`` a stopped tracee, delivering ``sig`` from a signal-delivery-stop."""
    _check(ptrace_raw(PTRACE_DETACH, tid, 0, sig), "PTRACE_DETACH", tid)


def getsiginfo(tid: int) -> bytes:
    """The raw ``siginfo_t`` of the signal that caused the current stop."""
    buffer = ctypes.create_string_buffer(SIGINFO_SIZE)
    _check(ptrace_raw(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buffer)), "PTRACE_GETSIGINFO", tid)
    return buffer.raw


def setsiginfo(tid: int, siginfo: bytes) -> None:
    """Replace the ``siginfo_t`` of the signal that caused the current stop."""
    buffer = ctypes.create_string_buffer(siginfo, SIGINFO_SIZE)
    _check(ptrace_raw(PTRACE_SETSIGINFO, tid, 0, ctypes.addressof(buffer)), "PTRACE_SETSIGINFO", tid)


def get_rseq_configuration(tid: int) -> RseqConfig | None:
    """The thread's rseq registration, or None when it has none (or the kernel predates 5.13)."""
    conf = _RseqConfiguration()
    try:
        check(
            ptrace_raw(PTRACE_GET_RSEQ_CONFIGURATION, tid, ctypes.sizeof(conf), ctypes.addressof(conf)),
            f"PTRACE_GET_RSEQ_CONFIGURATION of thread {tid}",
            # An unknown request: the kernel predates 5.13.
            classes={errno.EIO: FeatureUnavailable},
        )
    except FeatureUnavailable:
        return None
    if not conf.rseq_abi_pointer:
        return None
    return RseqConfig(int(conf.rseq_abi_pointer), int(conf.signature))


def wait_stop(tid: int, deadline_ns: int) -> WaitStatus | None:
    """Wait until tracee ``tid`` changes state, or return None at ``deadline_ns`` (monotonic)."""
    n_polls = 0
    sigchld_blocked = signal.SIGCHLD in signal.pthread_sigmask(signal.SIG_BLOCK, ())
    while True:
        try:
            waited, status = os.waitpid(tid, os.WNOHANG | WALL)
        except ChildProcessError:
            raise ProcessGone(errno.ECHILD, f"thread {tid} is no longer traced by us (gone)") from None
        if waited:
            return WaitStatus(status)
        now_ns = time.monotonic_ns()
        if now_ns >= deadline_ns:
            return None
        n_polls += 1
        if n_polls < _SPIN_YIELDS:
            os.sched_yield()
        elif sigchld_blocked:
            signal.sigtimedwait((signal.SIGCHLD,), min(_SIGCHLD_WAIT_CAP_S, (deadline_ns - now_ns) / 1e9))
        else:
            time.sleep(_SLEEP_S)


def reap_dead_tracee(tid: int, timeout_s: float) -> None:
    """Wait (bounded) for our tracee ``tid`` to finish dying, and collect it.

    Call it when a ptrace request failed because the tracee died (ESRCH). A traced thread's
    death is reported to its tracer, and its real parent cannot reap it until the tracer has
    waited for it (docs/injection.md): a target killed in the window stayed unreapable for
    as long as the helper lived. A stop reported before the death is passed over; a thread
    already collected, or never ours, returns at once.
    """
    deadline_ns = time.monotonic_ns() + int(timeout_s * 1e9)
    try:
        while (status := wait_stop(tid, deadline_ns)) is not None and not status.gone:
            pass
    except ProcessGone:
        return


def require_x86_64() -> None:
    """Raise :class:`FeatureUnavailable` on any architecture but x86_64."""
    if os.uname().machine != "x86_64":
        raise FeatureUnavailable(errno.ENOSYS, f"ptrace injection supports x86_64 only, not {os.uname().machine}")
