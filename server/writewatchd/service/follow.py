"""Following programs: tells sessions when their target executes a new program or makes a child.

The process-events connector reports every fork, exec and exit of the machine without
holding any process (docs/process-trees.md §2); the follower reads it on the event loop and
dispatches by tgid. Where it is unavailable, and after an overflow dropped events, the
followed processes are polled instead: the mm fingerprint for an exec, ``/proc/PID/task/*/
children`` for children. The decisions (re-arm, adopt, refuse) are the session manager's.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._exceptions import FeatureUnavailable, KernelError, WriteWatchError
from ..kernel.procevents import EventsLost, ProcEventKind, ProcEventListener
from ..kernel.procfs import child_pids

if TYPE_CHECKING:
    from .sessions import ManagedSession, SessionManager

__all__ = ["FollowCounters", "Follower", "PendingChild"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class FollowCounters:
    """What following did since the daemon started."""

    n_execs_followed: int = 0
    n_children_adopted: int = 0
    n_children_exited_early: int = 0
    """Children that exited before they could be attached: no session was left behind."""
    n_children_refused: int = 0
    """Children not followed because their tree reached ``max_sessions_per_tree`` (RESOURCE_EXHAUSTED)."""
    n_children_failed: int = 0
    n_events_lost: int = 0
    n_polls: int = 0


@dataclass(slots=True)
class PendingChild:
    """A child process seen (fork event or poll) whose session is being created.

    Its session id is chosen at once, so its own children, seen before its session exists,
    can already name it as their parent.
    """

    pid: int
    session_id: str
    parent_session_id: str
    root_session_id: str
    labels: dict[str, str]
    follow_exec: bool
    tick_interval_ms: int
    owner: str = ""
    """Who created the tree's root session: its children are theirs too."""
    max_staleness_ms: int = 1000
    """The parent's staleness bound: a child's session gets it too."""
    exec_seen: bool = False
    waiting_for_exec: bool = False
    """A vfork child still sharing its parent's memory: adopted at its exec."""


class Follower:
    """Process events (or polling) for every session that follows its target."""

    def __init__(self, manager: SessionManager, *, poll_interval_s: float, use_events: bool = True) -> None:
        self._manager = manager
        self._poll_interval_s = poll_interval_s
        self._use_events = use_events
        self._listener: ProcEventListener | None = None
        self._poll_task: asyncio.Task[None] | None = None
        self._started = False
        self.followed: dict[int, ManagedSession] = {}
        self.pending: dict[int, PendingChild] = {}
        self.counters = FollowCounters()
        self.mode = "off"

    def start(self) -> None:
        """Listen to process events, or poll when they are unavailable; idempotent."""
        if self._started:
            return
        self._started = True
        try:
            if not self._use_events:
                raise FeatureUnavailable(0, "turned off (process_events = false)")
            self._listener = ProcEventListener()
        except KernelError as exc:
            log.warning("process events unavailable (%s): exec and children are found by polling /proc", exc)
            self.mode = "polling"
            self._poll_task = asyncio.get_running_loop().create_task(self._poll_forever(), name="follow-poll")
            return
        self.mode = "events"
        asyncio.get_running_loop().add_reader(self._listener.fileno(), self._on_readable)

    def close(self) -> None:
        """Stop listening and polling."""
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        if self._poll_task is not None:
            self._poll_task.cancel()
            self._poll_task = None

    def watch(self, session: ManagedSession, *, poll: bool = True) -> None:
        """Tell ``session`` about its target's execs and children from now on.

        ``poll`` looks once at once, for what happened before the session was registered
        here (dispatched to nobody); a restarted daemon polls after re-adopting every session.
        """
        self.start()
        self.followed[session.record.pid] = session
        self.pending.pop(session.record.pid, None)
        if poll:
            self.poll(session)

    def unwatch(self, session: ManagedSession) -> None:
        """Forget ``session`` (it ended); with nothing left to watch, stop listening (no fd held)."""
        if self.followed.get(session.record.pid) is session:
            del self.followed[session.record.pid]
        if not self.followed and not self.pending:
            self.close()
            self._started = False
            self.mode = "off"

    def _on_readable(self) -> None:
        assert self._listener is not None
        try:
            events = self._listener.read()
        except EventsLost:
            self.counters.n_events_lost += 1
            log.warning("process events were lost (receive buffer overflow): polling every followed process")
            self.poll_all()
            return
        except KernelError as exc:
            log.error("process events failed (%s): polling /proc from now on", exc)
            self.close()
            self.mode = "polling"
            self._poll_task = asyncio.get_running_loop().create_task(self._poll_forever(), name="follow-poll")
            self.poll_all()
            return
        for event in events:
            if event.kind == ProcEventKind.EXEC:
                self._on_exec(event.tgid)
            elif event.kind == ProcEventKind.FORK and event.is_new_process:
                self._on_fork(event.parent_tgid, event.pid)
            elif event.kind == ProcEventKind.EXIT and event.pid == event.tgid:
                pending = self.pending.get(event.tgid)
                if pending is not None and pending.waiting_for_exec:
                    del self.pending[event.tgid]
                    self.counters.n_children_exited_early += 1

    def _on_exec(self, tgid: int) -> None:
        session = self.followed.get(tgid)
        if session is not None:
            session.exec_noticed()
            return
        pending = self.pending.get(tgid)
        if pending is None:
            return
        pending.exec_seen = True
        if pending.waiting_for_exec:
            pending.waiting_for_exec = False
            self._manager.run_in_background(self._manager.adopt_child(pending))

    def _on_fork(self, parent_tgid: int, child_pid: int) -> None:
        if self._manager.readopting:
            return  # polled once every session is back
        # Every fork on the machine comes here: two dict lookups dismiss the unrelated ones
        # before anything that looks at every session.
        parent = self.followed.get(parent_tgid)
        pending_parent = self.pending.get(parent_tgid) if parent is None else None
        if parent is None and pending_parent is None:
            return
        if child_pid in self.followed or child_pid in self.pending or self._manager.tracks_pid(child_pid):
            return
        if parent is not None:
            if parent.active and parent.record.follow_children:
                self._adopt(self._manager.pending_child(parent, child_pid))
            return
        if pending_parent is not None:
            self._adopt(self._manager.pending_child_of_pending(pending_parent, child_pid))

    def _adopt(self, pending: PendingChild | None) -> None:
        if pending is None:
            return
        self.pending[pending.pid] = pending
        self._manager.run_in_background(self._manager.adopt_child(pending))

    def poll(self, session: ManagedSession) -> None:
        """Look at one watched process: a new program, children not followed yet."""
        if not session.active:
            return
        session.exec_noticed()
        if not session.record.follow_children:
            return
        try:
            children = child_pids(session.record.pid)
        except WriteWatchError:
            return  # it exited: its pidfd ends the session
        for child in children:
            self._on_fork(session.record.pid, child)

    def poll_all(self) -> None:
        """:meth:`poll` every followed process."""
        self.counters.n_polls += 1
        for session in list(self.followed.values()):
            self.poll(session)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            self.poll_all()
