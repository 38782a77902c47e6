"""Which thread of a process to stop for an injection, and why (docs/injection.md §4).

A thread blocked in a restartable syscall first (read, futex, nanosleep, poll, wait...), then
one running, then a group-stopped one, then one blocked elsewhere, socket calls last. Never a
thread in D state, and never one blocked in a syscall that a ptrace stop turns into EINTR
(``epoll_wait``, ``semop``, ``sigtimedwait``, ``io_getevents`` and their variants; signal(7)).
"""

from __future__ import annotations

import enum
import errno
import os
from dataclasses import dataclass

from ..._exceptions import AccessDenied, ProcessGone
from ..procfs import read_stat, thread_ids

__all__ = ["EINTR_PRONE", "ThreadChoice", "ThreadRank", "choose_thread", "thread_activity"]

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
EINTR_PRONE = _EINTR_ON_STOP | _EINTR_WITH_TIMEOUT


class ThreadRank(enum.IntEnum):
    """How fit a thread is to be stopped: lower is better."""

    RESTARTABLE_SYSCALL = 0
    RUNNING = 1
    GROUP_STOPPED = 2
    BLOCKED_ELSEWHERE = 3
    SOCKET_SYSCALL = 4


@dataclass(frozen=True, slots=True)
class ThreadChoice:
    """A thread fit for injection, and why: its rank and what it is doing."""

    tid: int
    rank: ThreadRank
    activity: str


def thread_activity(pid: int, tid: int) -> tuple[str, str]:
    """(state letter, the ``syscall`` file's first field) of one thread; ("", "") if it is gone."""
    path = f"/proc/{pid}/task/{tid}/syscall"
    try:
        state = read_stat(pid, tid).state
        with open(path) as f:
            current = f.read().split()
    except (FileNotFoundError, ProcessGone):
        return "", ""
    except PermissionError as exc:
        raise AccessDenied(exc.errno or errno.EACCES, f"{path}: permission denied") from None
    return state, current[0] if current else ""


def _rank(state: str, current: str) -> ThreadChoice | str:
    """A ranked choice (for tid 0), or the reason the thread must not be used."""
    if state in ("", "Z", "X", "x"):
        return "exiting"
    if state == "D":
        return "in uninterruptible sleep (state D)"
    if state == "t":
        return "in a tracing stop"
    if state == "T":
        return ThreadChoice(0, ThreadRank.GROUP_STOPPED, "group-stopped")
    if current == "running" or state == "R":
        return ThreadChoice(0, ThreadRank.RUNNING, "running")
    if current == "-1":
        return ThreadChoice(0, ThreadRank.BLOCKED_ELSEWHERE, "blocked outside a syscall")
    try:
        nr = int(current)
    except ValueError:
        return f"in an unknown state ({state} {current})"
    if nr in _EINTR_ON_STOP:
        return f"blocked in syscall {nr}, which a ptrace stop would fail with EINTR"
    if nr in _RESTARTABLE:
        return ThreadChoice(0, ThreadRank.RESTARTABLE_SYSCALL, f"blocked in restartable syscall {nr}")
    if nr in _EINTR_WITH_TIMEOUT:
        return ThreadChoice(0, ThreadRank.SOCKET_SYSCALL, f"blocked in socket syscall {nr}")
    return ThreadChoice(0, ThreadRank.BLOCKED_ELSEWHERE, f"blocked in syscall {nr}")


def choose_thread(pid: int, preferred_tid: int | None = None) -> ThreadChoice | dict[int, str]:
    """The best thread of ``pid`` to stop, or every thread's reason for being unfit."""
    tids = [preferred_tid] if preferred_tid is not None else thread_ids(pid)
    if preferred_tid is not None and not os.path.exists(f"/proc/{pid}/task/{preferred_tid}"):
        return {preferred_tid: f"not a thread of process {pid}"}
    best: ThreadChoice | None = None
    reasons: dict[int, str] = {}
    for tid in tids:
        ranked = _rank(*thread_activity(pid, tid))
        if isinstance(ranked, str):
            reasons[tid] = ranked
            continue
        if best is None or ranked.rank < best.rank:
            best = ThreadChoice(tid, ranked.rank, ranked.activity)
            if ranked.rank == min(ThreadRank):
                break
    return best if best is not None else reasons
