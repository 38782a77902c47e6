"""Make an uncooperative process create a userfaultfd, and take it.

A userfaultfd acts on the memory of the process that created it, so the target itself has
to run ``userfaultfd(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)``. We make it do so with
ptrace, copy the new fd with ``pidfd_getfd`` and close the target's copy ("steal" mode,
docs/injection.md §1): afterwards the target's fd table is as before and the caller drives every
``UFFDIO_*`` ioctl itself, without stopping the target again.

How one injection runs:

1. *Before any stop*: read ``/proc/PID/status`` (refuse if already traced, strict seccomp,
   or non-dumpable for a non-root caller), open the pidfd and ``/proc/PID/mem``, find a
   ``0f 05`` (``syscall``) byte pair in the target's vDSO, choose a thread
   (:func:`choose_thread`), read its seccomp mode and, when a verdict for its filters is
   remembered, use it (a remembered refusal refuses here), and prepare the window's state.
2. ``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT`` that one thread and wait, bounded by the deadline,
   for its ``PTRACE_EVENT_STOP``. Other threads keep running: nothing is written into the
   target's code or data.
3. Save the registers. Unless a verdict is remembered, dump the thread's seccomp filters and
   evaluate them for the two syscalls we will run (:mod:`.seccomp`); refuse, untouched,
   unless both would be allowed. If the thread is inside an rseq critical section (only
   possible when it was stopped in user mode, since the rseq ABI forbids syscalls inside
   one), move the saved RIP to its abort handler and clear ``rseq_cs``, exactly as the
   kernel would have done.
4. For each syscall set ``rip`` = gadget, ``rax`` = number, arguments, and ``orig_rax = -1``
   (so the kernel's restart logic leaves our registers alone), then single-step and read
   ``rax`` at the SIGTRAP after the gadget. Other signals that stop the thread meanwhile
   are recorded and suppressed.
5. Restore the registers. The last stop is a signal-delivery-stop inside ``get_signal()``,
   so a restored ``rax = -ERESTART*`` with the original ``orig_rax`` lets the interrupted
   syscall restart. ``PTRACE_DETACH``, re-delivering the first held signal with its
   siginfo (others by ``tgkill``).

Decisions:

* **Two implementations of the window, same rules.** Steps 2-5 (from ``PTRACE_INTERRUPT``
  to ``PTRACE_DETACH``) run in C when they can (``_window.c``, a small shared library called
  through ctypes, which keeps the GIL released; :class:`_CSession`), else in Python
  (:class:`_Session`); ``window`` / :data:`DEFAULT_WINDOW` choose. Every decision stays in
  Python outside the window: thread choice, refusals, seccomp evaluation (between the stop
  and the first change, in Python for both), error mapping; the C code only runs the
  same ptrace sequence with the same rseq fix-up, EINTR rewrite, signal holding and
  re-delivery, and EXITKILL scope. The C window is compiled on first use with ``cc`` into
  a private cache directory, keyed by the hash of the source (:mod:`._window` documents
  the build and its fallback: without a compiler the Python window runs, with one logged
  warning). Measured on this 2-vCPU VM, interleaved on the same targets, the C window
  stops a target for about 100-150 µs (median), the Python window about 1.4-2x that.
* **What the window's time is.** Three hand-overs between tracer and tracee (the stop and
  two single-steps), each a wake-up of the other task, often on a halted vCPU: about
  25-35 µs each; the syscalls themselves are about 1-3 µs each and the Python overhead
  of the C window about 5 µs. The C window's waits sleep in ``sigtimedwait`` until the
  SIGCHLD that a ptrace stop sends the tracer (the helper blocks SIGCHLD): spinning before,
  with pause or with sched_yield, measured no faster and worse in the tail. The Python
  window yields 50 times before that sleep, which measured about 40 µs faster there
  (:func:`.ptrace.wait_stop`). The tracer runs the window at nice -20
  (:func:`_prioritized`) because on busy CPUs each hand-over can wait for a time slice.
* **A helper process does the tracing.** Injections run in a long-lived child process of the
  caller (started lazily, one request at a time, fds passed back with SCM_RIGHTS). ptrace
  binds a tracee to the *thread* that attached, and a seized thread that will not stop
  (state D) cannot be detached at all: only the tracer's exit releases it. The helper
  exits in that case (the next request starts a new one), leaving the target untouched.
* **Daemon death inside the window is harmless**: the helper is a separate process, finishes
  the injection (restoring the target's registers), detaches, and exits when it finds the
  daemon's end of the socket closed. The target keeps running with its own registers and
  an unchanged fd table; the stolen uffd dies with the helper (nothing was registered).
* **Helper death inside the window kills the target.** ``PTRACE_O_EXITKILL`` is set only
  while the target holds foreign registers (from just before the first ``PTRACE_SETREGS``
  until ``PTRACE_DETACH``). A helper killed then takes the target with it (SIGKILL),
  never leaving it running with wrong registers or a pending single-step SIGTRAP; a helper
  killed before (seized, waiting for the stop) leaves the target unharmed. The helper
  blocks catchable termination signals and asks for ``oom_score_adj = -1000``. The same
  rule covers an injected syscall that does not return within 5 s (it cannot block, so
  the thread is wedged): the helper exits and the target dies rather than run on wrongly.
* **Deadlines.** ``deadline_s`` bounds the choice of a thread and the wait for its stop.
  Once stopped, each injected syscall has its own fixed bound, so a slow machine never
  abandons a thread that holds our registers.
* **Thread choice** (:func:`choose_thread`): a thread blocked in a restartable syscall first
  (read, futex, nanosleep, poll, wait...), then one running, then a group-stopped one,
  then one blocked elsewhere, socket calls last. Never a thread in D state, and never one
  blocked in a syscall that a ptrace stop turns into EINTR (``epoll_wait``, ``semop``,
  ``sigtimedwait``, ``io_getevents`` and their variants; signal(7)). Should such a thread
  be stopped anyway (it entered that syscall after we chose it), its ``-EINTR`` is
  rewritten to ``-ERESTARTNOHAND`` so the syscall restarts (or fails with EINTR after all
  if a real signal handler runs, as it would have).
* **Seccomp** is evaluated for ``userfaultfd(flags)`` and ``close(0)`` (the fd number is
  not known beforehand) with ``ip`` = the address after the gadget, against the chosen
  thread's own filters (they are per thread without TSYNC). The filter dump needs the
  thread stopped, so the first injection into a filtered thread pays for it inside the
  window; its verdict is remembered by (thread, start time, number of filters, gadget):
  filters can only be added, so the same count means the same filters.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from .. import _exceptions
from .._exceptions import AccessDenied, FeatureUnavailable, InjectionRefused, KernelError, ProcessGone
from . import _window
from ._libc import SYS, libc, raise_errno, syscall
from .pidfd import pidfd_open
from .procfs import read_maps, read_status, thread_ids
from .ptrace import (
    PtraceEvent,
    PtraceOption,
    WaitStatus,
    detach,
    get_rseq_configuration,
    getregs,
    getsiginfo,
    interrupt,
    require_x86_64,
    resume,
    seize,
    setoptions,
    setregs,
    setsiginfo,
    singlestep,
    wait_stop,
)
from .seccomp import AUDIT_ARCH_X86_64, SeccompData, dump_filters, evaluate
from .uffd import UFFD_USER_MODE_ONLY, Userfaultfd

__all__ = [
    "DEFAULT_WINDOW",
    "InjectionResult",
    "ThreadChoice",
    "choose_thread",
    "find_vdso_gadget",
    "inject_userfaultfd",
    "Window",
]

_NR_CLOSE = 3
_NR_TGKILL = 234
_PR_SET_TIMERSLACK = 29
_UFFD_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY

_ERESTARTNOHAND = 514

# x86_64 syscall numbers, by how a ptrace stop treats a thread blocked in them.
_RESTARTABLE = frozenset(
    {
        0,  # read
        1,  # write
        7,  # poll
        17,  # pread64
        19,  # readv
        23,  # select
        34,  # pause
        35,  # nanosleep
        61,  # wait4
        73,  # flock
        202,  # futex
        230,  # clock_nanosleep
        247,  # waitid
        270,  # pselect6
        271,  # ppoll
        449,  # futex_waitv
    }
)
_EINTR_ON_STOP = frozenset(
    {
        65,  # semop
        128,  # rt_sigtimedwait
        208,  # io_getevents
        220,  # semtimedop
        232,  # epoll_wait
        281,  # epoll_pwait
        333,  # io_pgetevents
        441,  # epoll_pwait2
    }
)
# Socket calls fail with EINTR on a stop only under SO_RCVTIMEO/SO_SNDTIMEO; usable, last.
_EINTR_WITH_TIMEOUT = frozenset({42, 43, 44, 45, 46, 47, 288, 299, 307})
# Whose -EINTR caused by our interrupt is rewritten into a restart.
_EINTR_PRONE = _EINTR_ON_STOP | _EINTR_WITH_TIMEOUT

_HELPER_GRACE_S = 15.0
# Bound on one injected syscall (userfaultfd or close never block): past it the thread is
# stuck with our registers, and the helper exits so that EXITKILL ends it deterministically.
_STEP_LIMIT_NS = 5 * 10**9
_MESSAGE_BYTES = 1 << 16
Window = Literal["auto", "c", "python"]
#: The window used when a call names none (spawns included).
DEFAULT_WINDOW: Window = "auto"

#: Test-only: seconds the helper sleeps inside the window (after the injected userfaultfd).
_TEST_PAUSE_IN_WINDOW_S = 0.0
#: Test-only: stop the requested ``tid`` without vetting it (to reach the stop deadline).
_TEST_UNVETTED_TID = False


@dataclass(frozen=True, slots=True)
class InjectionResult:
    """A userfaultfd created by the target, now owned by the caller (``UFFDIO_API`` not done).

    ``stop_ns`` is how long the chosen thread ``tid`` was stopped, from ``PTRACE_INTERRUPT``
    until ``PTRACE_DETACH`` returned; ``window`` says which implementation of the window
    ran: ``"c"`` (compiled) or ``"python"``.
    """

    uffd: Userfaultfd
    tid: int
    stop_ns: int
    window: str


@dataclass(frozen=True, slots=True)
class ThreadChoice:
    """A thread fit for injection, and why: its rank (lower is better) and what it is doing."""

    tid: int
    rank: int
    activity: str


def inject_userfaultfd(
    pid: int, *, deadline_s: float = 1.0, tid: int | None = None, window: Window | None = None
) -> InjectionResult:
    """Make process ``pid`` create a userfaultfd, copy it to us, and close the target's copy.

    ``deadline_s`` bounds the wait for a thread to stop. ``tid`` asks for a particular
    thread, which must pass the same checks as an automatic choice. ``window`` chooses the
    implementation of the stop window: ``"auto"`` (compiled when it can be built, else
    Python), ``"c"`` (:class:`FeatureUnavailable` without it) or ``"python"``; None means
    :data:`DEFAULT_WINDOW`.

    Raises :class:`InjectionRefused` (target untouched and running) when the target is
    already traced, its seccomp filters would not allow the syscalls, it is not dumpable
    for a non-root caller, no thread can be stopped before the deadline, or it has no
    vDSO; :class:`ProcessGone` when it does not exist; :class:`AccessDenied` without the
    permission to trace it.
    """
    require_x86_64()
    request = {
        "op": "inject",
        "pid": pid,
        "tid": tid,
        "deadline_s": deadline_s,
        "pause_in_window_s": _TEST_PAUSE_IN_WINDOW_S,
        "unvetted": _TEST_UNVETTED_TID,
        "window": window or DEFAULT_WINDOW,
    }
    reply, fds = _HELPER.call(request, timeout_s=deadline_s + _HELPER_GRACE_S)
    uffd = Userfaultfd(fds[0], owner_pid=pid)
    return InjectionResult(uffd, int(reply["tid"]), int(reply["stop_ns"]), str(reply["window"]))


# --------------------------------------------------------------------------- preparation


def _thread_activity(pid: int, tid: int) -> tuple[str, str]:
    """(state letter, the ``syscall`` file's first field) of one thread; ("", "") if it is gone."""
    base = f"/proc/{pid}/task/{tid}"
    try:
        with open(f"{base}/stat") as f:
            stat = f.read()
        with open(f"{base}/syscall") as f:
            current = f.read().split()
    except FileNotFoundError:
        return "", ""
    except PermissionError as exc:
        raise AccessDenied(exc.errno or errno.EACCES, f"{base}: permission denied") from None
    state = stat[stat.rindex(")") + 2]
    return state, current[0] if current else ""


def _rank(state: str, current: str) -> ThreadChoice | str:
    """A ranked choice, or the reason the thread must not be used."""
    if state in ("", "Z", "X", "x"):
        return "exiting"
    if state == "D":
        return "in uninterruptible sleep (state D)"
    if state == "t":
        return "in a tracing stop"
    if state == "T":
        return ThreadChoice(0, 2, "group-stopped")
    if current == "running" or state == "R":
        return ThreadChoice(0, 1, "running")
    if current == "-1":
        return ThreadChoice(0, 3, "blocked outside a syscall")
    try:
        nr = int(current)
    except ValueError:
        return f"in an unknown state ({state} {current})"
    if nr in _EINTR_ON_STOP:
        return f"blocked in syscall {nr}, which a ptrace stop would fail with EINTR"
    if nr in _RESTARTABLE:
        return ThreadChoice(0, 0, f"blocked in restartable syscall {nr}")
    if nr in _EINTR_WITH_TIMEOUT:
        return ThreadChoice(0, 4, f"blocked in socket syscall {nr}")
    return ThreadChoice(0, 3, f"blocked in syscall {nr}")


def choose_thread(pid: int, preferred_tid: int | None = None) -> ThreadChoice | dict[int, str]:
    """The best thread of ``pid`` to stop, or every thread's reason for being unfit."""
    tids = [preferred_tid] if preferred_tid is not None else thread_ids(pid)
    if preferred_tid is not None and not os.path.exists(f"/proc/{pid}/task/{preferred_tid}"):
        return {preferred_tid: f"not a thread of process {pid}"}
    best: ThreadChoice | None = None
    reasons: dict[int, str] = {}
    for tid in tids:
        ranked = _rank(*_thread_activity(pid, tid))
        if isinstance(ranked, str):
            reasons[tid] = ranked
            continue
        if best is None or ranked.rank < best.rank:
            best = ThreadChoice(tid, ranked.rank, ranked.activity)
            if ranked.rank == 0:
                break
    return best if best is not None else reasons


def find_vdso_gadget(pid: int, mem_fd: int) -> int:
    """Address of a ``syscall`` instruction (bytes ``0f 05``) in the vDSO of ``pid``."""
    vdso = [m for m in read_maps(pid) if m.path == "[vdso]"]
    if not vdso:
        raise InjectionRefused(errno.ENOENT, f"process {pid} has no vDSO, so no syscall instruction to borrow")
    try:
        image = os.pread(mem_fd, vdso[0].length_bytes, vdso[0].start)
    except OSError as exc:
        raise_errno(exc.errno or errno.EIO, f"read the vDSO of process {pid}")
    offset = image.find(b"\x0f\x05")
    if offset < 0:
        raise InjectionRefused(errno.ENOENT, f"the vDSO of process {pid} holds no syscall instruction")
    return vdso[0].start + offset


def _refuse_early(pid: int) -> None:
    """Refusals that need no stop: already traced, strict seccomp, not dumpable for us."""
    status = read_status(pid)
    if status.tracer_pid:
        raise InjectionRefused(errno.EBUSY, f"process {pid} is already traced by process {status.tracer_pid}")
    if status.seccomp_mode == 1:
        raise InjectionRefused(errno.EPERM, f"process {pid} runs under strict seccomp, which forbids userfaultfd")
    if os.geteuid() != 0 and status.effective_uid != 0:
        # The files in /proc/PID are owned by root exactly when the task is not dumpable
        # (task_dump_owner); the directory itself keeps the task's uid.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(f"/proc/{pid}/status").st_uid == 0:
                raise InjectionRefused(
                    errno.EPERM, f"process {pid} is not dumpable; only root (CAP_SYS_PTRACE) may inject into it"
                )


def _open_mem(pid: int) -> int:
    try:
        return os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise_errno(exc.errno or errno.EIO, f"open /proc/{pid}/mem", hint="ptrace access to the target is needed")


# --------------------------------------------------------------------------- the window


class _StuckTracee(Exception):
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
class _SeccompCheck:
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
        for name, nr, args in (("userfaultfd", SYS["userfaultfd"], (_UFFD_FLAGS,)), ("close", _NR_CLOSE, (0,))):
            verdict = evaluate(filters, SeccompData(nr, AUDIT_ARCH_X86_64, self.gadget + 2, args))
            if not verdict.runs:
                message = f"the seccomp filter of process {self.pid} answers {verdict.describe()} to {name}()"
                _SECCOMP_VERDICTS[self.key] = (errno.EPERM, message)
                raise InjectionRefused(errno.EPERM, message)
        _SECCOMP_VERDICTS[self.key] = None


def _seccomp_check(pid: int, tid: int, gadget: int) -> _SeccompCheck | None:
    """Before the stop: the check the window must make, or None when none is needed.

    Filters are per thread (without TSYNC), so the chosen thread's own mode decides. None
    for a thread without filters or with a remembered verdict that allows both syscalls; a
    remembered refusal, or strict mode, is raised here without any stop.
    """
    base = f"/proc/{pid}/task/{tid}"
    try:
        with open(f"{base}/status") as f:
            fields = dict(line.partition(":")[::2] for line in f.read().splitlines())
        with open(f"{base}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        raise ProcessGone(errno.ESRCH, f"thread {tid} of process {pid} is gone") from None
    mode = int(fields.get("Seccomp", "0"))
    if mode == 1:
        raise InjectionRefused(errno.EPERM, f"thread {tid} of process {pid} runs under strict seccomp")
    if mode != 2:
        return None
    start_time = int(stat[stat.rindex(")") + 2 :].split()[19])
    key = (pid, tid, start_time, int(fields.get("Seccomp_filters", "-1")), gadget)
    if key not in _SECCOMP_VERDICTS:
        return _SeccompCheck(pid, tid, gadget, key)
    known = _SECCOMP_VERDICTS[key]
    if known is not None:
        raise InjectionRefused(*known)
    return None


def _stuck_in_step(tid: int) -> _StuckTracee:
    return _StuckTracee(InjectionRefused(errno.ETIMEDOUT, f"thread {tid} did not finish an injected syscall in time"))


def _stuck_in_release(tid: int) -> _StuckTracee:
    return _StuckTracee(InjectionRefused(errno.ETIMEDOUT, f"thread {tid} is stuck in an injected syscall"))


class _Session:
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
        interrupted = bool(self._first_stop.event) and self._first_stop.stop_signal == signal.SIGTRAP
        eintr_prone = self.saved.orig_rax_signed in _EINTR_PRONE
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
            if status.event:
                continue  # a group-stop or our interrupt's trap: nothing to hold
            if status.stop_signal != signal.SIGTRAP:
                self.held_signals.append((status.stop_signal, getsiginfo(self.tid)))
            now = getregs(self.tid)
            if now.rip == after_gadget:
                return now.rax_signed

    def steal(self, pause_s: float) -> int:
        """EXITKILL on, userfaultfd, pidfd_getfd, close: our copy of the target's new uffd."""
        self.arm()
        target_fd = self.run(SYS["userfaultfd"], _UFFD_FLAGS)
        if pause_s:
            time.sleep(pause_s)
        if target_fd < 0:
            _raise_uffd_failure(self.pid, -target_fd)
        stolen = -1
        try:
            stolen = _copy_fd(self.pid, self.pidfd, target_fd)
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


class _CSession:
    """The compiled window (``_window.c``): the same steps and rules as :class:`_Session`."""

    window = "c"

    def __init__(self, library: ctypes.CDLL, pid: int, tid: int, *, gadget: int, mem_fd: int, pidfd: int) -> None:
        self.pid = pid
        self.tid = tid
        self.gadget = gadget
        self._library = library
        state = _window.WindowState(pid=pid, tid=tid, pidfd=pidfd, mem_fd=mem_fd, gadget=gadget)
        state.uffd_flags = _UFFD_FLAGS
        state.step_limit_ns = _STEP_LIMIT_NS
        state.target_fd = -1
        state.stolen_fd = -1
        state.set_eintr_prone(_EINTR_PRONE)
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
        result = self._library.ww_stop(self._state_ref)
        if result == _window.WW_TIMEOUT:
            return False
        if result == _window.WW_GONE:
            raise ProcessGone(errno.ESRCH, f"process {self.pid} {WaitStatus(self.state.status).describe()}")
        self._check(result)
        return True

    def adopt(self, first_stop: WaitStatus) -> None:
        """Take over a thread that is already stopped (``first_stop``)."""
        self.state.status = first_stop.raw
        self._check(self._library.ww_save(self._state_ref))

    def steal(self, pause_s: float) -> int:
        """EXITKILL on, userfaultfd, pidfd_getfd, close: our copy of the target's new uffd."""
        state = self.state
        state.pause_ns = int(pause_s * 1e9)
        result = self._library.ww_steal(self._state_ref)
        stolen = int(state.stolen_fd)
        if result != _window.WW_OK:
            if stolen >= 0:
                os.close(stolen)
            if result == _window.WW_STUCK:
                raise _stuck_in_step(self.tid)
            if result == _window.WW_GONE:
                status = WaitStatus(state.status)
                raise ProcessGone(errno.ESRCH, f"process {self.pid} {status.describe()} during injection")
            self._check(result)
        if state.target_fd < 0:
            _raise_uffd_failure(self.pid, -state.target_fd)
        if stolen < 0:
            _raise_getfd_failure(self.pid, -stolen, int(state.target_fd))
        return stolen

    def restore_and_detach(self) -> None:
        """Put the registers back and let go, re-delivering held signals."""
        result = self._library.ww_release(self._state_ref)
        if result == _window.WW_STUCK:
            raise _stuck_in_release(self.tid)
        self._check(result)

    def _check(self, result: int) -> None:
        if result != _window.WW_OK:
            err = int(self.state.failed_errno)
            call = _window.CALL_NAMES[self.state.failed_call]
            if call == "waitpid" and err == errno.ECHILD:
                raise ProcessGone(errno.ECHILD, f"thread {self.tid} is no longer traced by us (gone)")
            raise_errno(err, f"{call} of thread {self.tid}")


def _copy_fd(pid: int, pidfd: int, target_fd: int) -> int:
    """``pidfd_getfd``: our own copy of the target's fd ``target_fd``."""
    fd = syscall(SYS["pidfd_getfd"], pidfd, target_fd, 0)
    if fd < 0:
        _raise_getfd_failure(pid, -fd, target_fd)
    return fd


def _raise_getfd_failure(pid: int, err: int, target_fd: int) -> NoReturn:
    raise_errno(err, f"pidfd_getfd(pid {pid}, fd {target_fd})", classes={errno.EPERM: AccessDenied})


def _open_window(pid: int, tid: int, window: str, *, gadget: int, mem_fd: int, pidfd: int) -> _CSession | None:
    """A compiled session for ``tid`` (not yet stopped), or None for the Python window."""
    if window == "python":
        return None
    library = _window.load()
    if library is None:
        if window == "c":
            raise FeatureUnavailable(errno.ENOSYS, "the compiled injection window is unavailable (see the log)")
        return None
    return _CSession(library, pid, tid, gadget=gadget, mem_fd=mem_fd, pidfd=pidfd)


def _stuck_at_stop(pid: int, tid: int) -> _StuckTracee:
    state, current = _thread_activity(pid, tid)
    return _StuckTracee(
        InjectionRefused(
            errno.ETIMEDOUT,
            f"thread {tid} of process {pid} did not stop before the deadline (state {state}, syscall {current})",
        )
    )


@contextlib.contextmanager
def _prioritized() -> Iterator[None]:
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


# How long a refused PTRACE_SEIZE waits to tell a dying target from a forbidden one.
_EXITING_GRACE_S = 0.2


def _stop(
    pid: int, tid: int, deadline_ns: int, compiled: _CSession | None, *, gadget: int, mem_fd: int, pidfd: int
) -> _Session | _CSession:
    """Seize and interrupt ``tid``; returns the session of the stopped thread (``compiled`` if given)."""
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
    if compiled is not None:
        if not compiled.stop(deadline_ns):
            raise _stuck_at_stop(pid, tid)
        return compiled
    interrupt_ns = time.monotonic_ns()
    interrupt(tid)
    status = wait_stop(tid, deadline_ns)
    if status is None:
        raise _stuck_at_stop(pid, tid)
    if status.gone:
        raise ProcessGone(errno.ESRCH, f"process {pid} {status.describe()}")
    session = _Session(pid, tid, status, gadget=gadget, mem_fd=mem_fd, pidfd=pidfd)
    session.interrupt_ns = interrupt_ns
    return session


def _inject_running(request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    pid = int(request["pid"])
    deadline_ns = time.monotonic_ns() + int(float(request["deadline_s"]) * 1e9)
    window = str(request.get("window") or "auto")
    _refuse_early(pid)
    mem_fd = _open_mem(pid)
    pidfd = -1
    try:
        pidfd = pidfd_open(pid)
        gadget = find_vdso_gadget(pid, mem_fd)
        preferred = request.get("tid")
        while True:
            choice = choose_thread(pid, preferred)
            if request.get("unvetted") and preferred is not None:
                choice = ThreadChoice(preferred, 0, "unvetted (test)")
            if isinstance(choice, ThreadChoice):
                break
            if time.monotonic_ns() >= deadline_ns:
                causes = "; ".join(f"thread {t} is {why}" for t, why in choice.items())
                raise InjectionRefused(errno.EAGAIN, f"no thread of process {pid} can be stopped safely: {causes}")
            time.sleep(0.001)
        seccomp = _seccomp_check(pid, choice.tid, gadget)
        # Before the seize: a seized thread that is never stopped could not be let go.
        compiled = _open_window(pid, choice.tid, window, gadget=gadget, mem_fd=mem_fd, pidfd=pidfd)
        with _prioritized():
            session = _stop(pid, choice.tid, deadline_ns, compiled, gadget=gadget, mem_fd=mem_fd, pidfd=pidfd)
            stolen = _steal_uffd(session, seccomp, float(request.get("pause_in_window_s") or 0))
    finally:
        os.close(mem_fd)
        if pidfd >= 0:
            os.close(pidfd)
    reply = {"tid": choice.tid, "stop_ns": session.detach_ns - session.interrupt_ns, "window": session.window}
    return reply, [stolen]


def _steal_uffd(
    session: _Session | _CSession,
    seccomp: _SeccompCheck | None,
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
    except _StuckTracee:
        raise
    except BaseException:
        if stolen >= 0:
            os.close(stolen)
        with contextlib.suppress(ProcessGone):
            session.restore_and_detach()
        raise
    session.restore_and_detach()
    return stolen


def _raise_uffd_failure(pid: int, err: int) -> NoReturn:
    if err in (errno.EPERM, errno.EACCES):
        raise InjectionRefused(
            err, f"process {pid} may not create a userfaultfd ({os.strerror(err)}; an LSM or container policy?)"
        )
    raise_errno(err, f"userfaultfd() injected into process {pid}")


# --------------------------------------------------------------------------- spawn support


def _wait_group_stopped(pid: int, deadline_ns: int) -> None:
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            raise ProcessGone(errno.ESRCH, f"spawned process {pid} vanished before exec") from None
        state = stat[stat.rindex(")") + 2]
        if state == "T":
            return
        if state in ("Z", "X"):
            raise ProcessGone(errno.ESRCH, f"spawned process {pid} exited before exec")
        if time.monotonic_ns() >= deadline_ns:
            raise KernelError(errno.ETIMEDOUT, f"spawned process {pid} did not reach its pre-exec stop")
        time.sleep(0.0002)


def _run_to_exec(pid: int, deadline_ns: int) -> WaitStatus:
    """Seize the self-stopped trampoline, continue it, and stop the new program before its first instruction.

    The exec event itself is no place to inject: the thread is still inside ``execve``, whose
    return value would overwrite our ``rax``. An interrupt queued at that stop traps the
    thread in ``get_signal()`` on its way out to user mode; that stop is returned.
    """
    seize(pid, PtraceOption.TRACEEXEC | PtraceOption.EXITKILL)
    os.kill(pid, signal.SIGCONT)
    exec_seen = False
    while True:
        status = wait_stop(pid, deadline_ns)
        if status is None:
            raise KernelError(errno.ETIMEDOUT, f"spawned process {pid} did not exec in time")
        if status.gone:
            raise ProcessGone(errno.ESRCH, f"spawned process {pid} {status.describe()} before exec")
        if status.event == PtraceEvent.EXEC:
            exec_seen = True
            interrupt(pid)
        elif exec_seen and status.event == PtraceEvent.STOP and status.stop_signal == signal.SIGTRAP:
            return status
        resume(pid, 0 if status.event else status.stop_signal)


def _spawn_inject(
    request: dict[str, Any], send: Callable[[dict[str, Any], list[int]], None], receive: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], list[int]]:
    pid = int(request["pid"])
    deadline_ns = time.monotonic_ns() + int(float(request["deadline_s"]) * 1e9)
    _wait_group_stopped(pid, deadline_ns)
    first_stop = _run_to_exec(pid, deadline_ns)
    started_ns = time.monotonic_ns()

    def hand_over(fd: int) -> None:
        try:
            send({"phase": "stopped"}, [fd])
        finally:
            os.close(fd)
        receive()

    mem_fd = _open_mem(pid)
    pidfd = -1
    try:
        pidfd = pidfd_open(pid)
        gadget = find_vdso_gadget(pid, mem_fd)
        window = str(request.get("window") or "auto")
        session: _Session | _CSession | None = _open_window(pid, pid, window, gadget=gadget, mem_fd=mem_fd, pidfd=pidfd)
        seccomp = _seccomp_check(pid, pid, gadget)
        with _prioritized():
            if isinstance(session, _CSession):
                session.adopt(first_stop)
            else:
                session = _Session(pid, pid, first_stop, gadget=gadget, mem_fd=mem_fd, pidfd=pidfd)
            stolen = _steal_uffd(
                session, seccomp, before_detach=hand_over if request.get("pause_before_start") else None
            )
    finally:
        os.close(mem_fd)
        if pidfd >= 0:
            os.close(pidfd)
    reply = {"phase": "done", "stop_ns": time.monotonic_ns() - started_ns, "window": session.window}
    return reply, [] if stolen < 0 else [stolen]


# --------------------------------------------------------------------------- the helper process


def _encode_error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, KernelError):
        return {"error": type(exc).__name__, "errno": exc.errno, "message": str(exc)}
    if isinstance(exc, _exceptions.WriteWatchError):
        return {"error": type(exc).__name__, "errno": 0, "message": str(exc)}
    return {"error": "KernelError", "errno": errno.EIO, "message": f"injection helper failed: {exc!r}"}


def _raise_error(reply: dict[str, Any]) -> None:
    cls = getattr(_exceptions, str(reply["error"]), KernelError)
    if isinstance(cls, type) and issubclass(cls, KernelError):
        raise cls(int(reply["errno"]), str(reply["message"]))
    if isinstance(cls, type) and issubclass(cls, _exceptions.WriteWatchError):
        raise cls(str(reply["message"]))
    raise KernelError(errno.EIO, str(reply["message"]))


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
    socket.send_fds(sock, [json.dumps(message).encode()], fds)


def _receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    data, fds, _flags, _address = socket.recv_fds(sock, _MESSAGE_BYTES, 4)
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    message: dict[str, Any] = json.loads(data)
    return message, list(fds)


def _helper_main(fd: int) -> None:
    """The helper process: serve requests until the caller's end of the socket closes."""
    # A signal meant for the daemon's process group must not end us inside a window.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})
    # Every ptrace stop sends us SIGCHLD: blocked (and not ignored, which an exec may have
    # inherited) it stays pending, so waits sleep until it instead of polling (wait_stop).
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    # Timed sleeps (a wait's bound) end on time instead of up to 50 µs late.
    libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("-1000")
    # Build (first run after a source change) or load the compiled window now, so that no
    # request's deadline pays for a compilation.
    _window.load()
    sock = socket.socket(fileno=fd)

    def send(message: dict[str, Any], fds: list[int]) -> None:
        _send(sock, message, fds)

    def receive() -> dict[str, Any]:
        got = _receive(sock)
        return got[0] if got else {}

    while True:
        got = _receive(sock)
        if got is None:
            return
        request, fds = got
        must_exit = False
        try:
            if request["op"] == "inject":
                reply, out_fds = _inject_running(request)
            elif request["op"] == "spawn":
                reply, out_fds = _spawn_inject(request, send, receive)
            else:
                reply, out_fds = {"pid": os.getpid()}, []
        except _StuckTracee as exc:
            reply, out_fds, must_exit = _encode_error(exc.refusal), [], True
        except Exception as exc:
            if not isinstance(exc, _exceptions.WriteWatchError):
                traceback.print_exc()
            reply, out_fds = _encode_error(exc), []
        finally:
            for fd_in in fds:
                os.close(fd_in)
        try:
            send(reply, out_fds)
        except OSError:
            return
        finally:
            for out in out_fds:
                os.close(out)
        if must_exit:
            # The thread we seized never stopped; our exit is the only way to release it.
            os._exit(0)


class _Helper:
    """The caller's side: starts the helper on demand and talks to it, one request at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None

    def pid(self) -> int:
        """The helper's pid, starting it if needed."""
        with self._lock:
            return self._ensure()[0].pid

    def _ensure(self) -> tuple[subprocess.Popen[bytes], socket.socket]:
        if self._process is not None and self._sock is not None and self._process.poll() is None:
            return self._process, self._sock
        self._discard()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        code = "import sys; from writewatchd.kernel.inject import _helper_main; _helper_main(int(sys.argv[1]))"
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", code, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._process, self._sock = process, ours
        return process, ours

    def _discard(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            self._process = None

    def call(
        self,
        request: dict[str, Any],
        *,
        timeout_s: float,
        fds: tuple[int, ...] = (),
        on_stopped: Callable[[dict[str, Any], list[int]], None] | None = None,
    ) -> tuple[dict[str, Any], list[int]]:
        """Send ``request``; return the final reply and the fds it carries (raising errors)."""
        with self._lock:
            _, sock = self._ensure()
            sock.settimeout(timeout_s)
            try:
                _send(sock, request, list(fds))
                while True:
                    got = _receive(sock)
                    if got is None:
                        raise KernelError(errno.EPIPE, "the injection helper died")
                    reply, reply_fds = got
                    if reply.get("phase") != "stopped" or on_stopped is None:
                        break
                    try:
                        on_stopped(reply, reply_fds)
                    finally:
                        _send(sock, {"op": "resume"}, [])
            except (TimeoutError, OSError) as exc:
                # A helper that does not answer may be stuck on a tracee; its exit releases it.
                self._discard()
                if isinstance(exc, KernelError):
                    raise
                raise KernelError(errno.ETIMEDOUT, f"the injection helper did not answer: {exc!r}") from None
        if "error" in reply:
            for fd in reply_fds:
                os.close(fd)
            if reply.get("errno") == errno.ETIMEDOUT and reply["error"] == "InjectionRefused":
                with self._lock:
                    self._discard()
            _raise_error(reply)
        return reply, reply_fds


_HELPER = _Helper()


def _helper_pid() -> int:
    """Test hook: the pid of the injection helper (started if needed)."""
    return _HELPER.pid()
