"""The stop window: from ``PTRACE_INTERRUPT`` to ``PTRACE_DETACH``, twice implemented, same rules.

:class:`CompiledWindow` runs the ptrace sequence in C (``_window.c``, through ctypes, which
keeps the GIL released); :class:`PythonWindow` runs it in Python. Every decision stays in
Python outside the window (thread choice, refusals, seccomp evaluation, error mapping). The
seccomp verdicts of earlier filter dumps are cached here (docs/injection.md §6). The two
implementations stay in one module (a little over 450 lines) so that their rules can be
read side by side.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from ..._exceptions import AccessDenied, FeatureUnavailable, InjectionRefused, ProcessGone
from .._libc import SYS, check, raise_errno, syscall
from ..pidfd import check_getfd, pidfd_getfd
from ..procfs import SeccompMode, read_stat, read_status
from ..ptrace import (
    PtraceEvent,
    PtraceOption,
    WaitStatus,
    detach,
    get_rseq_configuration,
    getregs,
    getsiginfo,
    interrupt,
    reap_dead_tracee,
    seize,
    setoptions,
    setregs,
    setsiginfo,
    singlestep,
    wait_stop,
)
from ..seccomp import AUDIT_ARCH_X86_64, SeccompData, dump_filters, evaluate
from ..uffd import UFFD_USER_MODE_ONLY
from . import _window
from ._window import WindowCall, WindowResult
from .threads import EINTR_PRONE, thread_activity

__all__ = [
    "CompiledWindow",
    "PythonWindow",
    "SeccompCheck",
    "StuckTracee",
    "Window",
    "open_window",
    "prioritized",
    "seccomp_check",
    "steal_uffd",
    "stop_thread",
]

_NR_CLOSE = 3
_NR_TGKILL = 234
UFFD_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY

_ERESTARTNOHAND = 514

# Bound on one injected syscall (userfaultfd or close never block): past it the thread is
# stuck with our registers, and the helper exits so that EXITKILL ends it deterministically.
_STEP_LIMIT_NS = 5 * 10**9

#: Which implementation of the window runs: compiled when it can be built, the compiled one
#: (FeatureUnavailable without it), or the Python one.
Window = Literal["auto", "c", "python"]


class StuckTracee(Exception):
    """A seized thread did not stop; only the tracer's exit can release it."""

    def __init__(self, refusal: InjectionRefused) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


# Verdicts of earlier filter dumps, by (pid, tid, thread start time, number of filters,
# gadget): a thread's filters can only be added to, so an unchanged count means unchanged
# filters, and the start time tells a reused tid apart. The value is the refusal's
# (errno, message), or None when both syscalls are allowed.
_SECCOMP_VERDICTS: dict[tuple[int, ...], tuple[int, str] | None] = {}
_SECCOMP_VERDICTS_MAX = 4096


@dataclass(frozen=True, slots=True)
class SeccompCheck:
    """A seccomp verdict still to be found, inside the window (the filter dump needs a stop)."""

    pid: int
    tid: int
    gadget: int
    key: tuple[int, ...]

    def run(self) -> None:
        """Refuse (nothing changed yet) unless the stopped thread's filters allow userfaultfd and close."""
        try:
            filters = dump_filters(self.tid)
        except AccessDenied as exc:
            raise InjectionRefused(
                exc.errno or errno.EPERM, f"process {self.pid} has seccomp filters we may not inspect: {exc}"
            ) from None
        if len(_SECCOMP_VERDICTS) >= _SECCOMP_VERDICTS_MAX:
            _SECCOMP_VERDICTS.clear()
        for name, nr, args in (("userfaultfd", SYS["userfaultfd"], (UFFD_FLAGS,)), ("close", _NR_CLOSE, (0,))):
            verdict = evaluate(filters, SeccompData(nr, AUDIT_ARCH_X86_64, self.gadget + 2, args))
            if not verdict.runs:
                message = f"the seccomp filter of process {self.pid} answers {verdict.describe()} to {name}()"
                _SECCOMP_VERDICTS[self.key] = (errno.EPERM, message)
                raise InjectionRefused(errno.EPERM, message)
        _SECCOMP_VERDICTS[self.key] = None


def seccomp_check(pid: int, tid: int, gadget: int) -> SeccompCheck | None:
    """Before the stop: the check the window must make, or None when none is needed.

    Filters are per thread (without TSYNC), so the chosen thread's own mode decides. None
    for a thread without filters or with a remembered verdict that allows both syscalls; a
    remembered refusal, or strict mode, is raised here without any stop.
    """
    try:
        status = read_status(pid, tid)
        start_time_ticks = read_stat(pid, tid).start_time_ticks
    except ProcessGone:
        raise ProcessGone(errno.ESRCH, f"thread {tid} of process {pid} is gone") from None
    if status.seccomp_mode == SeccompMode.STRICT:
        raise InjectionRefused(errno.EPERM, f"thread {tid} of process {pid} runs under strict seccomp")
    if status.seccomp_mode != SeccompMode.FILTER:
        return None
    key = (pid, tid, start_time_ticks, status.n_seccomp_filters, gadget)
    if key not in _SECCOMP_VERDICTS:
        return SeccompCheck(pid, tid, gadget, key)
    known = _SECCOMP_VERDICTS[key]
    if known is not None:
        raise InjectionRefused(*known)
    return None


def _stuck_in_step(tid: int) -> StuckTracee:
    return StuckTracee(InjectionRefused(errno.ETIMEDOUT, f"thread {tid} did not finish an injected syscall in time"))


def _stuck_in_release(tid: int) -> StuckTracee:
    return StuckTracee(InjectionRefused(errno.ETIMEDOUT, f"thread {tid} is stuck in an injected syscall"))


class PythonWindow:
    """The Python window: one stopped thread, the injected syscalls, and the way back."""

    window = "python"

    def __init__(self, pid: int, tid: int, first_stop: WaitStatus, *, gadget: int, mem_fd: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.tid = tid
        self.gadget = gadget
        self.mem_fd = mem_fd
        self.interrupt_ns = 0
        self.detach_ns = 0
        self.saved = getregs(tid)
        self.restored = self.saved.copy()
        # Built once: each injected syscall only changes the fields that differ.
        self._injected = self.saved.copy()
        self._injected.rip = gadget
        self._injected.orig_rax = 2**64 - 1
        self.held_signals: list[tuple[int, bytes]] = []
        self.armed = False
        self.stopped = True
        self._first_stop = first_stop

    def arm(self) -> None:
        """Make our death kill the target, then prepare the registers to restore."""
        # First: the rseq fix-up already writes to the target.
        setoptions(self.tid, PtraceOption.EXITKILL)
        self.armed = True
        self._fix_rseq()
        interrupted = self._first_stop.event != PtraceEvent.NONE and self._first_stop.stop_signal == signal.SIGTRAP
        eintr_prone = self.saved.orig_rax_signed in EINTR_PRONE
        if interrupted and eintr_prone and self.saved.rax_signed == -errno.EINTR:
            # Our PTRACE_INTERRUPT made this syscall fail with EINTR: restart it instead.
            self.restored.rax = (-_ERESTARTNOHAND) & (2**64 - 1)

    def _fix_rseq(self) -> None:
        if self.saved.orig_rax_signed >= 0:
            return  # stopped in a syscall, so outside any critical section (the rseq ABI forbids syscalls there)
        config = get_rseq_configuration(self.tid)
        if config is None:
            return
        rseq_cs_field = config.rseq_abi_pointer + 8
        try:
            (cs_address,) = struct.unpack("<Q", os.pread(self.mem_fd, 8, rseq_cs_field))
            if not cs_address:
                return
            _version, _flags, start_ip, post_commit_bytes, abort_ip = struct.unpack(
                "<IIQQQ", os.pread(self.mem_fd, 32, cs_address)
            )
            if not start_ip <= self.saved.rip < start_ip + post_commit_bytes:
                return
            (signature,) = struct.unpack("<I", os.pread(self.mem_fd, 4, abort_ip - 4))
        except OSError:
            return  # an unreadable rseq area: the kernel would fail the thread on its own
        if signature != config.signature:
            return
        # Leaving the section through our gadget would make the kernel drop the abort it
        # owes the thread; take the abort now, as the kernel would on preemption.
        self.restored.rip = abort_ip
        os.pwrite(self.mem_fd, b"\0" * 8, rseq_cs_field)

    def run(self, nr: int, arg0: int) -> int:
        """Run syscall ``nr(arg0)`` in the thread; returns its (signed) result."""
        deadline_ns = time.monotonic_ns() + _STEP_LIMIT_NS
        regs = self._injected
        regs.rax = nr
        regs.rdi = arg0
        setregs(self.tid, regs)
        after_gadget = self.gadget + 2
        while True:
            singlestep(self.tid)
            self.stopped = False
            status = wait_stop(self.tid, deadline_ns)
            if status is None:
                raise _stuck_in_step(self.tid)
            self.stopped = True
            if status.gone:
                raise ProcessGone(errno.ESRCH, f"process {self.pid} {status.describe()} during injection")
            if status.event != PtraceEvent.NONE:
                continue  # a group-stop or our interrupt's trap: nothing to hold
            if status.stop_signal != signal.SIGTRAP:
                self.held_signals.append((status.stop_signal, getsiginfo(self.tid)))
            now = getregs(self.tid)
            if now.rip == after_gadget:
                return now.rax_signed

    def steal(self, pause_s: float) -> int:
        """EXITKILL on, userfaultfd, pidfd_getfd, close: our copy of the target's new uffd."""
        self.arm()
        result = self.run(SYS["userfaultfd"], UFFD_FLAGS)
        if pause_s:
            time.sleep(pause_s)
        target_fd = _check_uffd(self.pid, result)
        stolen = -1
        try:
            stolen = pidfd_getfd(self.pid, target_fd, pidfd=self.pidfd)
        finally:
            try:
                self.run(_NR_CLOSE, target_fd)
            except BaseException:
                if stolen >= 0:
                    os.close(stolen)
                raise
        return stolen

    def restore_and_detach(self) -> None:
        """Put the registers back and let go, re-delivering held signals."""
        if not self.stopped:
            raise _stuck_in_release(self.tid)
        if self.armed:
            setregs(self.tid, self.restored)
        sig = 0
        if self.held_signals:
            sig, siginfo = self.held_signals[0]
            setsiginfo(self.tid, siginfo)
            for extra, _ in self.held_signals[1:]:
                syscall(_NR_TGKILL, self.pid, self.tid, extra)
        detach(self.tid, sig)
        self.detach_ns = time.monotonic_ns()


class CompiledWindow:
    """The compiled window (``_window.c``): the same steps and rules as :class:`PythonWindow`."""

    window = "c"

    def __init__(self, library: ctypes.CDLL, pid: int, tid: int, *, gadget: int, mem_fd: int, pidfd: int) -> None:
        self.pid = pid
        self.tid = tid
        self.gadget = gadget
        self._library = library
        state = _window.WindowState(pid=pid, tid=tid, pidfd=pidfd, mem_fd=mem_fd, gadget=gadget)
        state.uffd_flags = UFFD_FLAGS
        state.step_limit_ns = _STEP_LIMIT_NS
        state.target_fd = -1
        state.stolen_fd = -1
        state.set_eintr_prone(EINTR_PRONE)
        self.state = state
        self._state_ref = ctypes.byref(state)

    @property
    def interrupt_ns(self) -> int:
        return int(self.state.interrupt_ns)

    @property
    def detach_ns(self) -> int:
        return int(self.state.detach_ns)

    def stop(self, deadline_ns: int) -> bool:
        """Interrupt the seized thread and wait for its stop; False at the deadline."""
        self.state.stop_deadline_ns = deadline_ns
        result = WindowResult(self._library.ww_stop(self._state_ref))
        if result == WindowResult.TIMEOUT:
            return False
        if result == WindowResult.GONE:
            raise ProcessGone(errno.ESRCH, f"process {self.pid} {WaitStatus(self.state.status).describe()}")
        self._check(result)
        return True

    def adopt(self, first_stop: WaitStatus) -> None:
        """Take over a thread that is already stopped (``first_stop``)."""
        self.state.status = first_stop.raw
        self._check(WindowResult(self._library.ww_save(self._state_ref)))

    def steal(self, pause_s: float) -> int:
        """EXITKILL on, userfaultfd, pidfd_getfd, close: our copy of the target's new uffd."""
        state = self.state
        state.pause_ns = int(pause_s * 1e9)
        result = WindowResult(self._library.ww_steal(self._state_ref))
        stolen = int(state.stolen_fd)
        if result != WindowResult.OK:
            if stolen >= 0:
                os.close(stolen)
            if result == WindowResult.STUCK:
                raise _stuck_in_step(self.tid)
            if result == WindowResult.GONE:
                status = WaitStatus(state.status)
                raise ProcessGone(errno.ESRCH, f"process {self.pid} {status.describe()} during injection")
            self._check(result)
        _check_uffd(self.pid, int(state.target_fd))
        return check_getfd(stolen, pid=self.pid, target_fd=int(state.target_fd))

    def restore_and_detach(self) -> None:
        """Put the registers back and let go, re-delivering held signals."""
        result = WindowResult(self._library.ww_release(self._state_ref))
        if result == WindowResult.STUCK:
            raise _stuck_in_release(self.tid)
        self._check(result)

    def _check(self, result: WindowResult) -> None:
        if result != WindowResult.OK:
            call = WindowCall(self.state.failed_call)
            raise_errno(
                int(self.state.failed_errno),
                f"{call.describe()} of thread {self.tid}",
                # waitpid has no child to wait for once the thread is gone.
                classes={errno.ECHILD: ProcessGone},
                hints={errno.ECHILD: "no longer traced by us (gone)"},
            )


def open_window(pid: int, tid: int, window: str, *, gadget: int, mem_fd: int, pidfd: int) -> CompiledWindow | None:
    """A compiled window for ``tid`` (not yet stopped), or None for the Python window."""
    if window == "python":
        return None
    library = _window.load()
    if library is None:
        if window == "c":
            raise FeatureUnavailable(errno.ENOSYS, "the compiled injection window is unavailable (see the log)")
        return None
    return CompiledWindow(library, pid, tid, gadget=gadget, mem_fd=mem_fd, pidfd=pidfd)


def _stuck_at_stop(pid: int, tid: int) -> StuckTracee:
    state, current = thread_activity(pid, tid)
    return StuckTracee(
        InjectionRefused(
            errno.ETIMEDOUT,
            f"thread {tid} of process {pid} did not stop before the deadline (state {state}, syscall {current})",
        )
    )


@contextlib.contextmanager
def prioritized() -> Iterator[None]:
    """Run the block at nice -20, when we may (CAP_SYS_NICE), then go back.

    Each step of the window hands the CPU between us and the target, and on busy CPUs each
    hand-over can wait for a time slice. A heavier tracer is picked sooner: measured with
    the two alternating (400 windows each), the p99 stop fell from 1.5 ms to 0.75 ms next
    to one CPU hog and from 0.73 to 0.45 ms with a busy target thread, and the median did
    not rise. SCHED_FIFO was tried and rejected: its p99 was better still under hogs, but
    an RT tracer stays on its own CPU, so on an idle machine every hand-over woke a halted
    vCPU, and the median rose from about 100 to about 170 µs.
    """
    try:
        previous = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, -20)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, previous)


# How long a tracee killed in our hands may take to finish dying (its memory is freed first).
_REAP_TIMEOUT_S = 5.0

# How long a refused PTRACE_SEIZE waits to tell a dying target from a forbidden one.
_EXITING_GRACE_S = 0.2


def stop_thread(
    pid: int, tid: int, deadline_ns: int, compiled: CompiledWindow | None, *, gadget: int, mem_fd: int, pidfd: int
) -> PythonWindow | CompiledWindow:
    """Seize and interrupt ``tid``; returns the window of the stopped thread (``compiled`` if given)."""
    try:
        seize(tid)
    except AccessDenied:
        tracer = read_status(pid).tracer_pid
        if tracer:
            raise InjectionRefused(errno.EBUSY, f"process {pid} is already traced by process {tracer}") from None
        # A thread that is exiting refuses PTRACE_SEIZE with EPERM too: a dying target is gone,
        # not forbidden (its pidfd turns readable once the exit completes).
        if select.select([pidfd], [], [], _EXITING_GRACE_S)[0]:
            raise ProcessGone(errno.ESRCH, f"process {pid} exited during injection") from None
        raise
    try:
        if compiled is not None:
            if not compiled.stop(deadline_ns):
                raise _stuck_at_stop(pid, tid)
            return compiled
        interrupt_ns = time.monotonic_ns()
        interrupt(tid)
        status = wait_stop(tid, deadline_ns)
    except ProcessGone:
        reap_dead_tracee(tid, _REAP_TIMEOUT_S)
        raise
    if status is None:
        raise _stuck_at_stop(pid, tid)
    if status.gone:
        raise ProcessGone(errno.ESRCH, f"process {pid} {status.describe()}")
    session = PythonWindow(pid, tid, status, gadget=gadget, mem_fd=mem_fd, pidfd=pidfd)
    session.interrupt_ns = interrupt_ns
    return session


def steal_uffd(
    session: PythonWindow | CompiledWindow,
    seccomp: SeccompCheck | None,
    pause_s: float = 0.0,
    before_detach: Callable[[int], None] | None = None,
) -> int:
    """Inside the window: userfaultfd, pidfd_getfd, close; always restore and detach.

    ``before_detach`` receives the stolen fd while the target is still stopped (and then
    owns it: -1 is returned).
    """
    stolen = -1
    try:
        if seccomp is not None:
            seccomp.run()
        stolen = session.steal(pause_s)
        if before_detach is not None:
            handed_over, stolen = stolen, -1
            before_detach(handed_over)
    except StuckTracee:
        raise
    except BaseException:
        if stolen >= 0:
            os.close(stolen)
        with contextlib.suppress(ProcessGone):
            _release(session)
        raise
    try:
        _release(session)
    except ProcessGone:
        if stolen >= 0:
            os.close(stolen)
        raise
    return stolen


def _release(session: PythonWindow | CompiledWindow) -> None:
    """Restore and detach; a thread killed in the window is collected instead (ProcessGone)."""
    try:
        session.restore_and_detach()
    except ProcessGone:
        reap_dead_tracee(session.tid, _REAP_TIMEOUT_S)
        raise


_UFFD_REFUSALS = {errno.EPERM: InjectionRefused, errno.EACCES: InjectionRefused}


def _check_uffd(pid: int, result: int) -> int:
    """The fd the injected ``userfaultfd()`` answered, else raise."""
    return check(
        result,
        f"userfaultfd() injected into process {pid}",
        classes=_UFFD_REFUSALS,
        hints=dict.fromkeys(_UFFD_REFUSALS, "the process may not create one: an LSM or container policy?"),
    )
