"""Obtaining a tracker: attach (cooperative or injected), spawn, and re-adoption after a restart.

Everything here but :func:`readopt_tracker` blocks on the kernel: run it in the executor.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import subprocess
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._exceptions import KernelError, ProcessGone, RangeBusy, UsageError, WriteWatchError
from ..kernel import ProcessIdentity, Userfaultfd, mm_fingerprint, read_status
from ..kernel.procevents import shares_memory
from ..kernel.procfs import gained_privileges, read_cmdline
from ..tracking.tracker import Tracker
from .enums import AttachMode, EndReason
from .store import SessionRecord

if TYPE_CHECKING:
    from ..kernel.spawn import SpawnedProcess

__all__ = [
    "NotFollowable",
    "Readopted",
    "SessionSpec",
    "SharesMemory",
    "has_executed",
    "process_cmdline",
    "process_name",
    "process_uid",
    "readopt",
    "retrack_after_exec",
    "start_tracker",
    "track_child",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """A validated request for a new session."""

    attach_mode: AttachMode
    pid: int = 0
    uffd_fd: int | None = None
    argv: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    cwd: str | None = None
    ranges: tuple[tuple[int, int], ...] = ()
    auto_ranges: bool = False
    tick_interval_ms: int = 0
    labels: dict[str, str] | None = None
    owner: str = ""
    follow_exec: bool = True
    follow_children: bool = False
    max_staleness_ms: int | None = None
    """None: the daemon's default."""


class NotFollowable(WriteWatchError):
    """The program a target executed is not followed; the message says why."""


class SharesMemory(WriteWatchError):
    """A vfork child still runs on its parent's memory: a uffd made in it would track the parent."""


# A killed daemon's kernel resources are released fd by fd after its lock is: a successor
# that starts at once may find the memory still registered for a moment.
_READOPT_BUSY_ATTEMPTS = 5
_READOPT_BUSY_BACKOFF_S = 0.2
_EXEC_RETRIES = 3


def start_tracker(spec: SessionSpec, *, inject_deadline_s: float) -> tuple[Tracker, SpawnedProcess | None]:
    """Obtain the target's userfaultfd as ``spec`` says and start tracking (blocking)."""
    if spec.attach_mode == AttachMode.SPAWN:
        return _spawn(spec)
    _check_pid(spec.pid)
    if spec.attach_mode == AttachMode.COOPERATIVE:
        if spec.uffd_fd is None or spec.uffd_fd < 0:
            raise UsageError("cooperative attach needs uffd_fd, the target's userfaultfd fd number")
        uffd = Userfaultfd.from_process(spec.pid, spec.uffd_fd)
    elif spec.attach_mode == AttachMode.INJECT:
        uffd = _inject(spec.pid, inject_deadline_s)
    else:
        raise UsageError(f"unknown attach mode {spec.attach_mode}")
    try:
        return Tracker(ProcessIdentity.of(spec.pid), uffd, ranges=spec.ranges, auto=spec.auto_ranges), None
    except BaseException:
        uffd.close()
        raise


@dataclass(frozen=True, slots=True)
class Readopted:
    """What re-adoption made of one ACTIVE record.

    A ``tracker`` when adopted; else the ``(reason, message)`` the session ended with, or
    ``end`` None when another userfaultfd still tracks the memory (the record stays ACTIVE).
    """

    tracker: Tracker | None = None
    end: tuple[EndReason, str] | None = None


async def readopt(record: SessionRecord, executor: Executor, *, inject_deadline_s: float) -> Readopted:
    """Track the process of a previous daemon's session again, on a fresh userfaultfd."""
    identity = ProcessIdentity(record.pid, record.start_time_ticks)
    if not identity.is_alive():
        return Readopted(end=(EndReason.EXITED, "the process exited while the daemon was down"))
    try:
        tracker = await _readopt_tracker(record, identity, executor, inject_deadline_s=inject_deadline_s)
    except RangeBusy as exc:
        log.warning(
            "session %s (pid %d) not re-adopted, its record stays ACTIVE: another userfaultfd still "
            "tracks its memory (%s); is another writewatchd tracking pid %d?",
            record.session_id,
            record.pid,
            exc,
            record.pid,
        )
        return Readopted()
    except Exception as exc:
        if not identity.is_alive():
            return Readopted(end=(EndReason.EXITED, "the process exited while being re-adopted"))
        log.warning("could not re-adopt session %s (pid %d): %r", record.session_id, record.pid, exc)
        return Readopted(end=(EndReason.ERROR, f"re-adoption failed: {exc}"))
    return Readopted(tracker=tracker)


async def _readopt_tracker(
    record: SessionRecord, identity: ProcessIdentity, executor: Executor, *, inject_deadline_s: float
) -> Tracker:
    """A tracker on a fresh userfaultfd; EBUSY is retried while a dying predecessor releases its own."""
    loop = asyncio.get_running_loop()
    for attempt in range(_READOPT_BUSY_ATTEMPTS):
        try:
            uffd = await loop.run_in_executor(executor, _reobtain_uffd, record, inject_deadline_s)
            return await loop.run_in_executor(
                executor,
                functools.partial(Tracker, identity, uffd, ranges=record.ranges, auto=record.auto_ranges),
            )
        except RangeBusy:
            if attempt + 1 == _READOPT_BUSY_ATTEMPTS:
                raise
            await asyncio.sleep(_READOPT_BUSY_BACKOFF_S)
    raise AssertionError("unreachable")


def process_name(pid: int) -> str:
    """The process's name (``comm``), or ``""`` when it cannot be read."""
    try:
        return read_status(pid).name
    except WriteWatchError:
        return ""


def process_cmdline(pid: int) -> list[str]:
    """The process's argv, or ``[]`` when it cannot be read."""
    try:
        return read_cmdline(pid)
    except WriteWatchError:
        return []


def process_uid(pid: int) -> int:
    """The process's effective uid, or -1 when it cannot be read."""
    try:
        return read_status(pid).effective_uid
    except WriteWatchError:
        return -1


def retrack_after_exec(record: SessionRecord, old: Tracker | None, *, inject_deadline_s: float) -> Tracker | None:
    """A tracker of the program ``record``'s target runs now, or None if ``old`` is one (blocking).

    The fingerprint is read before the injection and again after the tracker exists: a uffd
    injected just before another exec would belong to a dead mm (docs/kernel.md §8.3).
    Raises :class:`NotFollowable` for a program that gained privileges, or a session of
    explicit ranges (they do not survive an exec).
    """
    pid = record.pid
    identity = ProcessIdentity(pid, record.start_time_ticks)
    for _ in range(_EXEC_RETRIES):
        # The exit is checked before the fingerprint is read: an exiting process releases
        # its mm (its stat then reads zeros) before its pidfd turns readable, so once the
        # pidfd is found unreadable, a fingerprint read after is the old one, zeros, or an exec's.
        if old is not None and old.has_exited():
            raise ProcessGone(errno.ESRCH, f"process {pid} has exited")
        before = mm_fingerprint(pid)
        if not any(before) or not identity.is_alive():
            raise ProcessGone(errno.ESRCH, f"process {pid} has exited")
        if old is not None and old.mm_fingerprint == before:
            return None
        why = gained_privileges(pid)
        if why:
            raise NotFollowable(why)
        if not record.auto_ranges:
            raise NotFollowable("explicit ranges do not survive an exec; track auto ranges to follow it")
        tracker = _inject_tracker(identity, inject_deadline_s)
        if tracker.mm_fingerprint == before == mm_fingerprint(pid):
            return tracker
        tracker.close()
        old = None
    raise KernelError(0, f"process {pid} kept executing new programs while being re-armed")


def has_executed(tracker: Tracker, *, exit_settle_s: float) -> bool:
    """Whether ``tracker``'s process runs another program now, after its tracked memory went (blocking).

    An exiting process releases its memory before its pidfd turns readable, which looks like
    an exec for that moment: the exit is checked before the fingerprint is read, and a
    process whose memory went with neither a new program nor an exit is given
    ``exit_settle_s`` to finish exiting.
    """
    if tracker.has_exited():
        return False
    try:
        current = mm_fingerprint(tracker.identity.pid)
    except ProcessGone:
        return False
    if any(current) and current != tracker.mm_fingerprint:
        return True
    return not tracker.wait_exited(exit_settle_s)


def track_child(pid: int, parent_pid: int, *, inject_deadline_s: float) -> Tracker:
    """Inject into a new child process and track all of it (blocking).

    Raises :class:`SharesMemory` for a vfork child still running on ``parent_pid``'s memory.
    """
    identity = ProcessIdentity.of(pid)
    if parent_pid and shares_memory(parent_pid, pid):
        raise SharesMemory(pid)
    before = mm_fingerprint(pid)
    tracker = _inject_tracker(identity, inject_deadline_s)
    if tracker.mm_fingerprint != before:
        # It executed while we injected; the exec event (or the first poll) re-arms it.
        tracker.close()
        return track_child(pid, 0, inject_deadline_s=inject_deadline_s)
    return tracker


def _inject_tracker(identity: ProcessIdentity, deadline_s: float) -> Tracker:
    """Inject into the process and track all of its memory (auto ranges)."""
    uffd = _inject(identity.pid, deadline_s)
    try:
        return Tracker(identity, uffd, auto=True)
    except BaseException:
        uffd.close()
        raise


def _inject(pid: int, deadline_s: float) -> Userfaultfd:
    from ..kernel.inject import inject_userfaultfd

    return inject_userfaultfd(pid, deadline_s=deadline_s).uffd


def _spawn(spec: SessionSpec) -> tuple[Tracker, SpawnedProcess]:
    from ..kernel.spawn import spawn_tracked

    if not spec.argv:
        raise UsageError("spawn needs argv")
    trackers: list[Tracker] = []

    def track_before_first_instruction(uffd: Userfaultfd) -> None:
        identity = ProcessIdentity.of(uffd.owner_pid)
        trackers.append(Tracker(identity, uffd, ranges=spec.ranges, auto=spec.auto_ranges))

    try:
        spawned = spawn_tracked(
            list(spec.argv),
            env=spec.env,
            cwd=spec.cwd,
            stdin=subprocess.DEVNULL,
            before_start=track_before_first_instruction,
        )
    except FileNotFoundError as exc:
        raise UsageError(f"cannot spawn {spec.argv[0]!r}: {exc.strerror}") from None
    return trackers[0], spawned


def _reobtain_uffd(record: SessionRecord, inject_deadline_s: float) -> Userfaultfd:
    if record.attach_mode == AttachMode.COOPERATIVE and record.uffd_fd is not None:
        return Userfaultfd.from_process(record.pid, record.uffd_fd)
    return _inject(record.pid, inject_deadline_s)


def _check_pid(pid: int) -> None:
    if pid <= 0:
        raise UsageError(f"pid must be > 0, got {pid}")
    try:
        read_status(pid)
    except ProcessGone:
        raise ProcessGone(errno.ESRCH, f"process {pid} does not exist") from None
