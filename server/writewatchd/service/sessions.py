"""Sessions: one tracked process each, with its hub and views, and the manager of them all.

Harvests (kernel scan plus delta encoding) run in the thread pool, so the event loop never
blocks on the kernel. Sessions of one tick interval are harvested together by a
:class:`~.ticker.Ticker`; how a tracker is obtained (attach, spawn, re-adoption) is in
:mod:`.attach`. A per-session asyncio lock serialises tick and on-demand harvests, which
keeps delta numbers in publication order.

Longer than 450 lines on purpose: a :class:`ManagedSession` and the :class:`SessionManager`
that creates, re-adopts, prunes and shuts sessions down are one unit (a session calls back
into its manager to persist, join a ticker, run background work and prune), and what has a
seam of its own (the ticker, the attach logic, the hub) already lives apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._exceptions import (
    AccessDenied,
    AlreadyTracked,
    InjectionRefused,
    LimitExceeded,
    ProcessGone,
    SessionEnded,
    SessionNotFound,
    UsageError,
    ViewNotFound,
    WriteWatchError,
)
from ..kernel import PAGE_SIZE, ScanResult, mm_fingerprint
from ..tracking.delta import Delta
from ..tracking.heat import MAX_STALENESS_MS, HeatStatistics
from ..tracking.rate import DirtyRate, RateEstimator
from ..tracking.regions import EMPTY, RegionArray, as_regions, n_pages
from ..tracking.tracker import HarvestStatistics, Tracker
from ..tracking.views import View
from ..tracking.writewatch import WriteWatchResult
from .attach import (
    NotFollowable,
    SessionSpec,
    SharesMemory,
    has_executed,
    process_cmdline,
    process_name,
    process_uid,
    readopt,
    retrack_after_exec,
    start_tracker,
    track_child,
)
from .enums import AttachMode, EndReason, SessionState
from .follow import Follower, PendingChild
from .hub import Hub, Published, Subscriber
from .settings import Settings
from .store import SessionRecord, StateStore
from .ticker import Ticker, tick_interval_ms

if TYPE_CHECKING:
    from ..kernel.spawn import SpawnedProcess

__all__ = ["Harvested", "ManagedSession", "Readoption", "SessionManager"]

log = logging.getLogger(__name__)

Encoder = Callable[[str, Delta], Sequence[bytes]]


_MAX_VIEW_NAME_BYTES = 256


def _check_view_name(name: str) -> None:
    if not name:
        raise UsageError("view_id must not be empty")
    if len(name.encode()) > _MAX_VIEW_NAME_BYTES:
        raise UsageError(f"view_id must be at most {_MAX_VIEW_NAME_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class Harvested:
    """What one on-demand harvest did.

    ``delta`` is what this harvest published, ``None`` when it found nothing new: a tick
    harvest may have published the same writes a moment earlier. ``(epoch, seq)`` is the
    barrier: every write completed before the harvest is in a published delta of ``epoch``
    with a seq <= ``seq``.
    """

    delta: Delta | None
    epoch: int
    seq: int


class ManagedSession:
    """A tracked process inside the daemon.

    The ticker drives its tick harvests through :meth:`settle_tick` and :meth:`complete_harvest`;
    everything else that harvests or changes the tracker runs inside :meth:`_exclusive`; the
    daemon's shutdown goes through :meth:`close_for_shutdown`.
    """

    def __init__(
        self,
        record: SessionRecord,
        tracker: Tracker | None,
        manager: SessionManager,
        *,
        spawned: SpawnedProcess | None = None,
    ) -> None:
        settings = manager.settings
        self.record = record
        self.tracker = tracker
        self.views: dict[str, View] = {name: View(name) for name in record.views}
        self.rate = RateEstimator(page_size_bytes=PAGE_SIZE)
        self.hub = Hub(
            lambda delta: manager.encode(record.session_id, delta),
            epoch=record.epoch,
            max_queued=settings.subscriber_queue_deltas,
            history_max_deltas=settings.history_max_deltas,
            history_max_bytes=settings.history_max_bytes,
        )
        self._manager = manager
        self._spawned = spawned
        self.harvest_lock = asyncio.Lock()
        """Serialises on-demand harvests and tracker changes (:meth:`_exclusive` holds it)."""
        self._exec_check_queued = False
        self._pidfd = -1
        self.settled = record.state == SessionState.ENDED
        """Ended, and its last record written: retention may prune it."""

    @property
    def session_id(self) -> str:
        """The session's id."""
        return self.record.session_id

    @property
    def active(self) -> bool:
        """Whether the session still tracks its process."""
        return self.record.state == SessionState.ACTIVE

    @property
    def tracked(self) -> RegionArray:
        """The ranges tracked now (none once the session has ended)."""
        return self.tracker.tracked if self.tracker is not None else EMPTY

    @property
    def statistics(self) -> HarvestStatistics:
        """Harvest counters (zero for a session that ended before this daemon started).

        ``n_harvests`` counts full harvests and the ticks that scanned some of its ranges.
        """
        if self.tracker is None:
            return HarvestStatistics()
        heat = self.heat_statistics()
        stats = self.tracker.statistics
        return stats if heat is None else dataclasses.replace(stats, n_harvests=stats.n_harvests + heat.n_scanned_ticks)

    @property
    def max_staleness_ms(self) -> int:
        """The staleness bound of heat-scheduled scanning (docs/api.md)."""
        return self.record.max_staleness_ms

    @property
    def _ticker(self) -> Ticker:
        return self._manager.ticker(self.record.tick_interval_ms)

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """The harvest lock, once a tick in flight has published; ticks leave the session out meanwhile.

        So deltas are numbered in publication order and a barrier sees every tick before it.
        """
        async with self.harvest_lock, self._ticker.exclusive(self):
            yield

    def heat_statistics(self) -> HeatStatistics | None:
        """How the session's scans are scheduled (None when it is not ticking)."""
        return self._ticker.scheduler.statistics(self.session_id) if self.active else None

    def _require_active(self) -> Tracker:
        """The tracker of an active session; the one place that raises :class:`SessionEnded`."""
        if self.tracker is None or not self.active:
            message = f": {self.record.end_message}" if self.record.end_message else ""
            raise SessionEnded(f"session {self.session_id} has ended{message}")
        return self.tracker

    async def begin(self) -> None:
        """Publish the epoch's first delta (a RESYNC), then :meth:`start`; a target already gone ends the session."""
        with contextlib.suppress(SessionEnded):
            await self.harvest_now()
        if self.active:
            self.start()
            self._manager.follower.watch(self, poll=not self._manager.readopting)

    def start(self) -> None:
        """Join the ticker of the session's tick interval, and watch for the target's exit."""
        if not self.active:  # the target went while the session was being created
            return
        self._manager.ticker(self.record.tick_interval_ms).add(self)
        # The tracker's pidfd turns readable when the process exits: the session ends at once,
        # whatever its tick interval. Opened with the tracker, it also sees an exit that came
        # before this point (a pid opened now could be gone, or recycled).
        if self.tracker is not None:
            self._pidfd = self.tracker.exit_fd
            asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        self._close_pidfd()
        if self.active:
            self._manager.run_in_background(self._finish_after_exit())

    async def _finish_after_exit(self) -> None:
        async with self._exclusive():  # an on-demand harvest in flight settles first
            await self.finish(EndReason.EXITED, f"process {self.record.pid} exited")

    def _close_pidfd(self) -> None:
        if self._pidfd < 0:
            return
        asyncio.get_running_loop().remove_reader(self._pidfd)  # the tracker closes the fd
        self._pidfd = -1

    async def harvest_now(self) -> Harvested:
        """Harvest at once and publish to every consumer (see :class:`Harvested`).

        Raises :class:`SessionEnded` when the session has ended, also when this harvest finds
        the target gone (the session then ends).
        """
        self._require_active()
        async with self._exclusive():
            return await self._harvest_locked()

    async def _harvest_locked(self) -> Harvested:
        self._require_active()
        loop = asyncio.get_running_loop()
        try:
            published = await loop.run_in_executor(self._manager.executor, self.harvest_blocking)
        except ProcessGone as exc:
            await self._finish_gone(exc)
            self._require_active()
            raise
        # Read under the lock: no other harvest can publish between this one and the position.
        return Harvested(self._publish(published), self.hub.epoch, self.hub.last_seq)

    async def flush(self) -> tuple[int, int]:
        """``(epoch, seq)``: every write completed before the call is in a published delta of
        ``epoch`` with a seq <= ``seq`` (harvesting first, so also when nothing new was written)."""
        harvested = await self.harvest_now()
        return harvested.epoch, harvested.seq

    def _publish(self, published: Published | None) -> Delta | None:
        if published is None:
            return None
        delta = self.hub.publish(published)
        for view in self.views.values():
            view.add(delta.regions)
        return delta

    async def _finish_gone(self, exc: ProcessGone) -> None:
        pid = self.record.pid
        tracker = self.tracker
        loop = asyncio.get_running_loop()
        executed = functools.partial(has_executed, exit_settle_s=_EXIT_SETTLE_S)
        if tracker is not None and await loop.run_in_executor(self._manager.executor, executed, tracker):
            if self.record.follow_exec:
                await self._follow_exec_locked()
                return
            await self.finish(EndReason.EXECED, f"process {pid} executed a new program; attach again to track it")
            return
        await self.finish(EndReason.EXITED, f"process {pid} exited ({exc})")

    def exec_noticed(self) -> None:
        """The target may have executed a new program: follow it, or end ``EXECED`` (in the background)."""
        if self.active and not self._exec_check_queued:
            self._exec_check_queued = True
            self._manager.run_in_background(self._on_exec())

    async def _on_exec(self) -> None:
        async with self._exclusive():
            self._exec_check_queued = False
            if not self.active:
                return
            if self.record.follow_exec:
                await self._follow_exec_locked()
                return
            tracker = self.tracker
            loop = asyncio.get_running_loop()
            try:
                current = await loop.run_in_executor(self._manager.executor, mm_fingerprint, self.record.pid)
            except WriteWatchError:
                return  # it exited: its pidfd ends the session
            # An exiting process (its mm already released) or a zombie reads zeros: an exit,
            # which the pidfd reports, is not an exec.
            if tracker is not None and any(current) and tracker.mm_fingerprint != current:
                pid = self.record.pid
                await self.finish(EndReason.EXECED, f"process {pid} executed a new program; attach again to track it")

    async def _follow_exec_locked(self) -> None:
        """Track the program the target runs now, in a new epoch starting with a RESYNC.

        Nothing happens when the tracker already belongs to it. A program that cannot be
        followed (set-user-ID, not dumpable, injection refused, explicit ranges) ends the
        session ``EXECED`` with the reason; nothing stays half attached.
        """
        pid = self.record.pid
        loop = asyncio.get_running_loop()
        old = self.tracker
        try:
            tracker = await loop.run_in_executor(
                self._manager.executor,
                functools.partial(
                    retrack_after_exec, self.record, old, inject_deadline_s=self._manager.inject_deadline_s
                ),
            )
        except ProcessGone as exc:
            await self.finish(EndReason.EXITED, f"process {pid} exited ({exc})")
            return
        except (NotFollowable, InjectionRefused, AccessDenied) as exc:
            await self.finish(EndReason.EXECED, f"process {pid} executed a new program that is not followed: {exc}")
            return
        except WriteWatchError as exc:
            log.warning("session %s: following the exec of pid %d failed: %r", self.session_id, pid, exc)
            await self.finish(EndReason.EXECED, f"process {pid} executed a new program; following it failed: {exc}")
            return
        if tracker is None:
            return
        self.tracker = tracker
        self._ticker.replace(self)  # the new program's pagemap, its ranges due at once
        if self._pidfd >= 0:  # the exit is watched through the tracker's pidfd: the new one's now
            self._close_pidfd()
            self._pidfd = tracker.exit_fd
            loop.add_reader(self._pidfd, self._on_exit)
        if old is not None:
            await loop.run_in_executor(self._manager.executor, old.close)
        record = self.record
        record.n_execs_followed += 1
        record.comm = process_name(pid)
        record.cmdline = process_cmdline(pid)
        record.uffd_fd = None  # the target's own fd did not survive the exec: re-adoption injects
        record.epoch = time.time_ns()
        self.hub.new_epoch(record.epoch)
        self._manager.follower.counters.n_execs_followed += 1
        log.info(
            "session %s: pid %d executed %s; following it in epoch %d", self.session_id, pid, record.comm, record.epoch
        )
        with contextlib.suppress(SessionEnded):
            await self._harvest_locked()  # the new epoch's first delta: a RESYNC of every tracked page
        if self.active:
            await self._manager.persist(record)

    def harvest_blocking(self) -> Published | None:
        """A full harvest, numbered (in a worker thread, inside :meth:`_exclusive`); ``None`` when idle.

        Raises :class:`ProcessGone` once the target has exited, :class:`SessionEnded` once the session has.
        """
        tracker = self._require_active()
        started_ns = time.monotonic_ns()
        regions = tracker.harvest()  # raises ProcessGone once the target has exited
        self._ticker.note_full_scan(self, regions, started_ns)
        return self._prepare(regions, None)

    def settle_tick(
        self, found: list[RegionArray], failed: list[tuple[int, int, int]], covered: RegionArray | None
    ) -> Published | None:
        """What a tick's scan of ``covered`` (None: everything) found, settled and numbered; ``None`` when idle."""
        regions = self._require_active().settle(found, failed)
        return self._prepare(regions, covered)

    def _prepare(self, regions: RegionArray, covered: RegionArray | None) -> Published | None:
        if len(regions) == 0 and self.hub.last_seq:
            return None  # the common idle case: nothing to count, number or encode
        self.rate.add(n_pages(regions), len(regions))
        # Nobody subscribes: the frames are made when a subscriber first needs them, if ever.
        return self.hub.prepare(
            regions, resync=self.hub.last_seq == 0, encode_now=self.hub.n_subscribers > 0, covered=covered
        )

    async def complete_harvest(self, outcome: Published | BaseException | None) -> None:
        """Publish what :meth:`settle_tick` returned, or settle what it raised (the ticker's side)."""
        if isinstance(outcome, ProcessGone):
            await self._finish_gone(outcome)
        elif isinstance(outcome, BaseException):
            if not isinstance(outcome, SessionEnded):  # a harvester must never die silently
                log.error("harvest of session %s failed: %r", self.session_id, outcome)
                await self.finish(EndReason.ERROR, f"harvest failed: {outcome}")
        else:
            self._publish(outcome)
        self._reap()

    async def close_for_shutdown(self) -> None:
        """End every stream with DAEMON_SHUTDOWN and release the kernel resources; the record stays ACTIVE."""
        if not self.active:
            return
        self.hub.finish(EndReason.DAEMON_SHUTDOWN, "the daemon is shutting down")
        self._close_pidfd()
        async with self._exclusive():  # let an on-demand harvest finish first
            if self.tracker is not None:
                self.tracker.close()

    def _reap(self) -> None:
        if self._spawned is not None:
            self._spawned.poll()

    def view(self, name: str) -> View:
        """The view named ``name``; raises :class:`ViewNotFound`."""
        _check_view_name(name)
        view = self.views.get(name)
        if view is None:
            raise ViewNotFound(f"session {self.session_id} has no view {name!r}; create it first (CreateView)")
        return view

    async def create_view(self, name: str) -> tuple[View, bool]:
        """The view named ``name``, created empty if there is none; ``(view, created)``.

        Writes up to now are harvested and published first, under the harvest lock, and
        the view is registered before the lock is released: it receives every delta
        published after, so it sees exactly the writes made after this call returns (and
        possibly some made during it), whatever the ticks do.
        """
        _check_view_name(name)
        existing = self.views.get(name)
        if existing is not None:
            return existing, False
        self._require_active()
        async with self._exclusive():
            existing = self.views.get(name)
            if existing is not None:
                return existing, False
            if len(self.views) >= self._manager.settings.max_views_per_session:
                raise LimitExceeded(f"session {self.session_id} already has {len(self.views)} views")
            await self._harvest_locked()
            view = self.views[name] = View(name)
            self.record.views = sorted(self.views)
        await self._manager.persist(self.record)
        return view, True

    async def delete_view(self, name: str) -> None:
        """Forget a view; raises :class:`ViewNotFound`."""
        self.view(name)
        del self.views[name]
        self.record.views = sorted(self.views)
        if self.active:
            await self._manager.persist(self.record)

    async def _harvest_for_view(self) -> None:
        """Harvest so a view sees writes up to the call; a target that is gone leaves the view as it was."""
        if self.active:
            with contextlib.suppress(SessionEnded):
                await self.harvest_now()

    async def get_write_watch(
        self, view_id: str, address: int, size_bytes: int, *, max_count: int, flags: int
    ) -> WriteWatchResult:
        """Win32 ``GetWriteWatch`` on one view, after a harvest (so it sees writes up to the call)."""
        view = self.view(view_id)
        await self._harvest_for_view()
        return view.get_write_watch(self.tracked, address, size_bytes, max_count=max_count, flags=flags)

    async def reset_write_watch(self, view_id: str, address: int, size_bytes: int) -> None:
        """Win32 ``ResetWriteWatch`` on one view, after a harvest."""
        view = self.view(view_id)
        await self._harvest_for_view()
        view.reset_write_watch(self.tracked, address, size_bytes)

    def subscribe(self, resume: tuple[int, int] | None, filter_ranges: RegionArray | None) -> Subscriber:
        """A new subscriber (see :meth:`Hub.subscribe`)."""
        if self.active and self.hub.n_subscribers >= self._manager.settings.max_subscribers_per_session:
            raise LimitExceeded(f"session {self.session_id} already has {self.hub.n_subscribers} subscribers")
        return self.hub.subscribe(self.tracked, resume=resume, filter_ranges=filter_ranges)

    def scan(self, start: int, end: int, **masks: int) -> ScanResult:
        """A read-only PAGEMAP_SCAN of the target (blocking; run it in the executor)."""
        return self._require_active().scan(start, end, **masks)

    def dirty_rate(self) -> DirtyRate:
        """Written pages/bytes/regions per second over the last second."""
        return self.rate.rate()

    async def change_ranges(self, ranges: Sequence[tuple[int, int]], *, add: bool) -> None:
        """Track more explicit ranges, or stop tracking some."""
        self._require_active()
        if not ranges:
            raise UsageError("no ranges given")
        async with self._exclusive():
            loop = asyncio.get_running_loop()
            tracker = self._require_active()
            change = tracker.add_ranges if add else tracker.remove_ranges
            await loop.run_in_executor(self._manager.executor, change, as_regions(ranges))
            self.record.ranges = [(int(s), int(e)) for s, e in tracker.tracked.tolist()]
        await self._manager.persist(self.record)

    async def finish(self, reason: EndReason, message: str) -> None:
        """End the session: streams get their final message, the kernel resources are released."""
        if not self.active:
            return
        self.record.state = SessionState.ENDED
        self.record.end_reason = int(reason)
        self.record.end_message = message
        self.record.ended_at_unix_ns = time.time_ns()
        self.hub.finish(reason, message)
        self._manager.follower.unwatch(self)
        await self._ticker.discard(self)  # no scan in flight uses the tracker after this
        self._close_pidfd()
        if self.tracker is not None:
            await asyncio.get_running_loop().run_in_executor(self._manager.executor, self.tracker.close)
        self._reap()
        await self._manager.persist(self.record)
        self.settled = True
        self._manager.prune_ended()


@dataclass(slots=True)
class Readoption:
    """What :meth:`SessionManager.readopt` did with each ACTIVE record of the store."""

    adopted: list[ManagedSession] = field(default_factory=list)
    exited: list[SessionRecord] = field(default_factory=list)
    failed: list[SessionRecord] = field(default_factory=list)
    kept: list[SessionRecord] = field(default_factory=list)


class SessionManager:
    """Every session of the daemon, and the thread pool their harvests run in."""

    def __init__(self, settings: Settings, store: StateStore, encode: Encoder) -> None:
        self.settings = settings
        self.store = store
        self.encode = encode
        self.executor = ThreadPoolExecutor(settings.harvest_threads, thread_name_prefix="harvest")
        self._sessions: dict[str, ManagedSession] = {}
        self._tickers: dict[int, Ticker] = {}
        self._attaching: set[int] = set()
        self.background: set[asyncio.Task[None]] = set()
        self._prune_timer: asyncio.TimerHandle | None = None
        self.follower = Follower(
            self, poll_interval_s=settings.process_poll_interval_ms / 1000, use_events=settings.process_events
        )
        self.readopting = False

    def ticker(self, interval_ms: int) -> Ticker:
        """The ticker of one tick interval, created on first use."""
        ticker = self._tickers.get(interval_ms)
        if ticker is None:
            ticker = self._tickers[interval_ms] = Ticker(
                self.executor,
                interval_ms,
                scan_threads=self.settings.scan_threads,
                execs_reported=lambda: self.follower.mode == "events",
            )
        return ticker

    def tickers(self) -> list[Ticker]:
        """The tickers of every tick interval in use."""
        return list(self._tickers.values())

    def __len__(self) -> int:
        return len(self._sessions)

    def tracks_pid(self, pid: int) -> bool:
        """Whether an active session tracks process ``pid``."""
        return any(s.active and s.record.pid == pid for s in self._sessions.values())

    def get(self, session_id: str) -> ManagedSession:
        """The session ``session_id``; raises :class:`SessionNotFound`."""
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}")
        return session

    def sessions(self) -> list[ManagedSession]:
        """All sessions, oldest first."""
        return sorted(self._sessions.values(), key=lambda s: s.record.created_at_unix_ns)

    async def persist(self, record: SessionRecord) -> None:
        """Write one record to the state store (off the event loop)."""
        await asyncio.get_running_loop().run_in_executor(self.executor, self.store.put, record)

    async def create(self, spec: SessionSpec) -> ManagedSession:
        """Attach to (or spawn) the target, start tracking, publish the epoch's first RESYNC."""
        active = sum(1 for s in self._sessions.values() if s.active)
        if active >= self.settings.max_sessions:
            raise LimitExceeded(f"the daemon already tracks {active} sessions (max_sessions)")
        tick_ms = tick_interval_ms(
            spec.tick_interval_ms,
            default_ms=self.settings.default_tick_interval_ms,
            min_ms=self.settings.min_tick_interval_ms,
        )
        if len(spec.ranges) > self.settings.max_ranges_per_session:
            raise LimitExceeded(f"{len(spec.ranges)} ranges exceed max_ranges_per_session")
        if not spec.auto_ranges and not spec.ranges:
            raise UsageError("give ranges, or auto_ranges=true")
        if spec.max_staleness_ms is not None and spec.max_staleness_ms > MAX_STALENESS_MS:
            raise UsageError(f"max_staleness_ms must be <= {MAX_STALENESS_MS}")
        loop = asyncio.get_running_loop()
        if spec.attach_mode != AttachMode.SPAWN:
            self._claim(spec.pid)
        try:
            tracker, spawned = await loop.run_in_executor(
                self.executor, functools.partial(start_tracker, spec, inject_deadline_s=self.inject_deadline_s)
            )
        finally:
            self._attaching.discard(spec.pid)
        identity = tracker.identity
        pid = identity.pid
        record = SessionRecord(
            session_id=_new_session_id(),
            pid=pid,
            start_time_ticks=identity.start_time_ticks,
            attach_mode=int(spec.attach_mode),
            created_at_unix_ns=time.time_ns(),
            ranges=[(int(s), int(e)) for s, e in as_regions(spec.ranges).tolist()],
            auto_ranges=spec.auto_ranges,
            tick_interval_ms=tick_ms,
            labels=dict(spec.labels or {}),
            uffd_fd=spec.uffd_fd,
            argv=list(spec.argv),
            epoch=time.time_ns(),
            comm=process_name(pid),
            uid=process_uid(pid),
            owner=spec.owner,
            follow_exec=spec.follow_exec,
            follow_children=spec.follow_children,
            max_staleness_ms=self.settings.default_max_staleness_ms
            if spec.max_staleness_ms is None
            else spec.max_staleness_ms,
            cmdline=process_cmdline(pid),
        )
        session = ManagedSession(record, tracker, self, spawned=spawned)
        self._sessions[record.session_id] = session
        await self.persist(record)
        await session.begin()
        return session

    def _claim(self, pid: int) -> None:
        """One active session per process: two sessions sharing a cooperative target's
        userfaultfd would take each other's dirty bits, and deleting one would unregister both."""
        holder = next((s for s in self._sessions.values() if s.active and s.record.pid == pid), None)
        if holder is not None:
            raise AlreadyTracked(
                f"pid {pid} is already tracked by session {holder.session_id}: subscribe to it, "
                "add ranges to it, or delete it first"
            )
        if pid in self._attaching:
            raise AlreadyTracked(f"pid {pid} is being attached by another request")
        self._attaching.add(pid)

    async def readopt(self) -> Readoption:
        """Re-adopt the live sessions of a previous daemon; record the dead ones as EXITED.

        Each re-adopted session starts a new epoch whose first delta is a RESYNC. A session
        whose memory another userfaultfd still tracks (its holder is alive: a daemon on
        another state dir, or a predecessor still dying) is neither adopted nor ended; its
        record stays ACTIVE for whoever holds it.
        """
        self.readopting = True
        try:
            outcome = await self._readopt_records()
        finally:
            self.readopting = False
        # Children born while the daemon was down are adopted now that every session of
        # the tree exists again (adopting one before its own record would duplicate it).
        self.follower.poll_all()
        self.prune_ended()
        return outcome

    async def _readopt_records(self) -> Readoption:
        outcome = Readoption()
        for record in self.store.load(SessionState.ENDED):
            self._add_ended(record)
        for record in self.store.load(SessionState.ACTIVE):
            readopted = await readopt(record, self.executor, inject_deadline_s=self.inject_deadline_s)
            if readopted.tracker is None:
                if readopted.end is None:
                    outcome.kept.append(record)
                    continue
                await self._record_ended(record, *readopted.end)
                (outcome.exited if readopted.end[0] == EndReason.EXITED else outcome.failed).append(record)
                continue
            tracker = readopted.tracker
            record.epoch = time.time_ns()
            # The views come back with the first delta of the new epoch, a RESYNC: every
            # tracked page written, since what happened meanwhile is unknown.
            session = ManagedSession(record, tracker, self)
            self._sessions[record.session_id] = session
            await self.persist(record)
            await session.begin()
            outcome.adopted.append(session)
        return outcome

    async def _record_ended(self, record: SessionRecord, reason: EndReason, message: str) -> None:
        record.state = SessionState.ENDED
        record.end_reason = int(reason)
        record.end_message = message
        record.ended_at_unix_ns = time.time_ns()
        await self.persist(record)
        self._add_ended(record)

    def _add_ended(self, record: SessionRecord) -> None:
        if not record.ended_at_unix_ns:  # a record written before ended_at_unix_ns existed
            record.ended_at_unix_ns = record.created_at_unix_ns
        session = ManagedSession(record, None, self)
        session.hub.finish(EndReason(record.end_reason or EndReason.ERROR), record.end_message)
        self._sessions[record.session_id] = session

    def descendants(self, session_id: str) -> list[ManagedSession]:
        """The sessions of followed descendants of ``session_id`` (children before their children)."""
        found: list[ManagedSession] = []
        parents = {session_id}
        while parents:
            children = [s for s in self._sessions.values() if s.record.parent_session_id in parents]
            found.extend(children)
            parents = {s.session_id for s in children}
        return found

    async def delete(self, session_id: str, *, recursive: bool = False) -> None:
        """End a session (reason DELETED), release everything, and forget it; with
        ``recursive``, also the sessions of every followed descendant."""
        session = self.get(session_id)
        if recursive:
            for descendant in reversed(self.descendants(session_id)):
                if descendant.session_id in self._sessions:
                    await self.delete(descendant.session_id)
        await session.finish(EndReason.DELETED, "the session was deleted")
        if self._sessions.pop(session_id, None) is not None:  # retention may have pruned it meanwhile
            await asyncio.get_running_loop().run_in_executor(self.executor, self.store.delete, session_id)

    def prune_ended(self) -> None:
        """Forget ended sessions past the retention time or count, and plan the next expiry."""
        settings = self.settings
        now_ns = time.time_ns()
        retention_ns = int(settings.ended_session_retention_s * 1e9)
        ended = sorted((s for s in self._sessions.values() if s.settled), key=lambda s: s.record.ended_at_unix_ns)
        n_expired = sum(1 for s in ended if now_ns - s.record.ended_at_unix_ns >= retention_ns)
        n_gone = max(n_expired, len(ended) - settings.ended_session_max_count)
        gone, kept = ended[:n_gone], ended[n_gone:]
        for session in gone:
            del self._sessions[session.session_id]
        if gone:
            ids = [s.session_id for s in gone]
            log.info(
                "pruned %d ended sessions (retention %g s, at most %d kept)",
                len(ids),
                settings.ended_session_retention_s,
                settings.ended_session_max_count,
            )
            self.run_in_background(self._forget(ids))
        if self._prune_timer is not None:
            self._prune_timer.cancel()
            self._prune_timer = None
        if kept:
            delay_s = (kept[0].record.ended_at_unix_ns + retention_ns - now_ns) / 1e9
            self._prune_timer = asyncio.get_running_loop().call_later(max(delay_s, 0), self.prune_ended)

    async def _forget(self, session_ids: list[str]) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self.executor, functools.partial(self.store.delete, *session_ids)
        )

    def run_in_background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` as a task that :meth:`shutdown` waits for."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def shutdown(self) -> None:
        """End every stream with DAEMON_SHUTDOWN; records stay ACTIVE so a restart re-adopts them."""
        self.follower.close()
        for ticker in self._tickers.values():
            await ticker.stop()
        if self._prune_timer is not None:
            self._prune_timer.cancel()
        # Exits noticed already are recorded (they need the executor, which is going away).
        await asyncio.gather(*self.background, return_exceptions=True)
        for session in list(self._sessions.values()):
            await session.close_for_shutdown()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def pending_child(self, parent: ManagedSession, pid: int) -> PendingChild:
        """A child process of ``parent``'s target, to be adopted as a session of its own."""
        record = parent.record
        return PendingChild(
            pid=pid,
            session_id=_new_session_id(),
            parent_session_id=record.session_id,
            root_session_id=record.root_session_id or record.session_id,
            labels=dict(record.labels),
            follow_exec=record.follow_exec,
            tick_interval_ms=record.tick_interval_ms,
            owner=record.owner,
            max_staleness_ms=record.max_staleness_ms,
        )

    def pending_child_of_pending(self, parent: PendingChild, pid: int) -> PendingChild:
        """A child of a process whose own session is still being created."""
        return PendingChild(
            pid=pid,
            session_id=_new_session_id(),
            parent_session_id=parent.session_id,
            root_session_id=parent.root_session_id,
            labels=dict(parent.labels),
            follow_exec=parent.follow_exec,
            tick_interval_ms=parent.tick_interval_ms,
            owner=parent.owner,
            max_staleness_ms=parent.max_staleness_ms,
        )

    def _tree_size(self, root_session_id: str) -> int:
        """Active sessions of the tree, plus children being adopted into it."""
        n_sessions = sum(
            1
            for s in self._sessions.values()
            if s.active and root_session_id in (s.session_id, s.record.root_session_id)
        )
        return n_sessions + sum(1 for p in self.follower.pending.values() if p.root_session_id == root_session_id)

    async def adopt_child(self, pending: PendingChild) -> None:
        """Make ``pending`` a session (its children are followed too); never raises.

        A child that exits first leaves nothing behind (counted); a tree at
        ``max_sessions_per_tree`` refuses it (RESOURCE_EXHAUSTED, logged and counted); a vfork
        child still sharing its parent's memory waits for its exec.
        """
        counters = self.follower.counters
        if not pending.exec_seen and self.follower.mode == "events":
            # Most children exec at once (fork+exec). Waiting for that exec avoids injecting
            # into a thread inside execve, which can leave it stopped with no tracer
            # (docs/process-trees.md §7); the exec event wakes nothing, the wait is short.
            await asyncio.sleep(_FORK_EXEC_GRACE_S)
        if self.follower.pending.get(pending.pid) is not pending:
            return
        active = sum(1 for s in self._sessions.values() if s.active)
        limit = self.settings.max_sessions_per_tree
        # The tree's count includes this child's own pending entry.
        if self._tree_size(pending.root_session_id) > limit or active >= self.settings.max_sessions:
            del self.follower.pending[pending.pid]
            counters.n_children_refused += 1
            log.warning(
                "RESOURCE_EXHAUSTED: child pid %d of session %s not followed: its tree (root %s) is full "
                "(max_sessions_per_tree %d, max_sessions %d)",
                pending.pid,
                pending.parent_session_id,
                pending.root_session_id,
                limit,
                self.settings.max_sessions,
            )
            return
        parent = self._sessions.get(pending.parent_session_id)
        parent_pid = parent.record.pid if parent is not None else 0
        try:
            tracker = await self._track_child_retrying(pending.pid, parent_pid)
        except SharesMemory:
            pending.waiting_for_exec = True
            if pending.exec_seen:  # the exec came while we looked
                pending.waiting_for_exec = False
                self.run_in_background(self.adopt_child(pending))
            return
        except ProcessGone:
            self.follower.pending.pop(pending.pid, None)
            counters.n_children_exited_early += 1
            return
        except (WriteWatchError, OSError) as exc:
            self.follower.pending.pop(pending.pid, None)
            counters.n_children_failed += 1
            log.warning("child pid %d of session %s not followed: %s", pending.pid, pending.parent_session_id, exc)
            return
        if self.follower.pending.get(pending.pid) is not pending:
            tracker.close()  # the daemon is shutting down, or the child was adopted otherwise
            return
        identity = tracker.identity
        record = SessionRecord(
            session_id=pending.session_id,
            pid=identity.pid,
            start_time_ticks=identity.start_time_ticks,
            attach_mode=int(AttachMode.INJECT),
            created_at_unix_ns=time.time_ns(),
            auto_ranges=True,
            tick_interval_ms=pending.tick_interval_ms,
            labels=pending.labels,
            epoch=time.time_ns(),
            comm=process_name(identity.pid),
            follow_exec=pending.follow_exec,
            follow_children=True,
            parent_session_id=pending.parent_session_id,
            root_session_id=pending.root_session_id,
            cmdline=process_cmdline(identity.pid),
            uid=process_uid(identity.pid),
            owner=pending.owner,
            max_staleness_ms=pending.max_staleness_ms,
        )
        session = ManagedSession(record, tracker, self)
        self._sessions[record.session_id] = session
        counters.n_children_adopted += 1
        await self.persist(record)
        await session.begin()
        if not session.active:
            self.follower.pending.pop(pending.pid, None)

    async def _track_child_retrying(self, pid: int, parent_pid: int) -> Tracker:
        """:meth:`_track_child`, tried again while the child lives: a child caught in the middle
        of its own execve can refuse the injection once."""
        loop = asyncio.get_running_loop()
        for attempt in range(_ADOPT_ATTEMPTS):
            try:
                return await loop.run_in_executor(
                    self.executor,
                    functools.partial(track_child, pid, parent_pid, inject_deadline_s=self.inject_deadline_s),
                )
            except (ProcessGone, SharesMemory):
                raise
            except (WriteWatchError, OSError):
                if attempt + 1 == _ADOPT_ATTEMPTS:
                    raise
                await asyncio.sleep(_ADOPT_RETRY_S * 2**attempt)
        raise AssertionError("unreachable")

    @property
    def inject_deadline_s(self) -> float:
        """How long an injection may hold its target stopped."""
        return self.settings.inject_deadline_ms / 1000


def _new_session_id() -> str:
    return f"s-{secrets.token_hex(6)}"


_FORK_EXEC_GRACE_S = 0.05
_EXIT_SETTLE_S = 1.0
_ADOPT_ATTEMPTS = 5
_ADOPT_RETRY_S = 0.02  # doubled after each failure: 0.62 s in all
