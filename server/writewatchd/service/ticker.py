"""Tick intervals and the :class:`Ticker` that harvests every session of one interval.

Sessions that share a tick interval share one ticker, and a tick is a batched call into
compiled code (:class:`~writewatchd.kernel.batchscan.BatchScanner`) over the ranges its
:class:`~writewatchd.tracking.heat.HeatScheduler` says are due, across all the sessions.
Python then touches only the sessions whose scan found something (or failed, or has newly
tracked ranges to report). A tick scans and publishes the chunks due every tick (the hot
ones); half an interval later a second batch scans the cooler ones that are due: the walk of
cold memory, long in a big session, never delays the hot writes nor competes with their
delivery. A small batch runs on the event loop (the hand-off to a thread costs more than the
scan); a long one runs in the thread pool, split across ``scan_threads`` threads when the
kernel's walk, not the GIL, is the limit.

An on-demand harvest (flush, harvest, a view's call), a range change or the end of a session
goes through :meth:`Ticker.exclusive`: it waits for a tick in flight to publish, and the
session is left out of the ticks that start meanwhile, so deltas stay in publication order
and a barrier stays exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from .._exceptions import ProcessGone, UsageError
from ..kernel.batchscan import BatchResult, BatchScanner, harvest_parallel
from ..tracking.heat import HeatScheduler, TickPlan, Tier
from ..tracking.regions import EMPTY, RegionArray, as_regions, merge, n_bytes
from ..tracking.tracker import Tracker
from .hub import Published

__all__ = ["MAX_TICK_INTERVAL_MS", "Tickable", "Ticker", "TickerStatistics", "tick_interval_ms"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_R = TypeVar("_R")

MAX_TICK_INTERVAL_MS = 3_600_000
# A batch that walks fewer pages than this runs on the event loop (~0.1 ms of kernel time).
_INLINE_MAX_PAGES = 1 << 16
# ...and its outcomes are settled there too when they hold fewer regions than this.
_INLINE_MAX_REGIONS = 4096
# A longer batch of hot chunks is scanned and published in at most this many parts.
_MAX_PARTS = 4


def tick_interval_ms(requested_ms: int, *, default_ms: int, min_ms: int) -> int:
    """The tick interval a session gets for ``requested_ms`` (0: the default); raises :class:`UsageError`."""
    if requested_ms > MAX_TICK_INTERVAL_MS:
        raise UsageError(f"tick_interval_ms must be <= {MAX_TICK_INTERVAL_MS}")
    if requested_ms == 0:
        return default_ms
    if requested_ms < min_ms:
        raise UsageError(f"tick_interval_ms {requested_ms} is below the minimum {min_ms}")
    return requested_ms


class Tickable(Protocol):
    """What a ticker needs of a session (:class:`~.sessions.ManagedSession` is one)."""

    @property
    def session_id(self) -> str:
        """The session's id."""

    @property
    def active(self) -> bool:
        """Whether the session is still harvested."""

    @property
    def tracker(self) -> Tracker | None:
        """The session's tracker (None once it has ended)."""

    @property
    def max_staleness_ms(self) -> int:
        """The session's staleness bound."""

    def settle_tick(
        self, found: list[RegionArray], failed: list[tuple[int, int, int]], covered: RegionArray | None
    ) -> Published | None:
        """Turn what a tick found for the session into a numbered delta (None: nothing new)."""

    async def complete_harvest(self, outcome: Published | BaseException | None) -> None:
        """Publish what :meth:`settle_tick` returned, or settle what it raised."""


@dataclass(frozen=True, slots=True)
class TickerStatistics:
    """Counters of one ticker."""

    interval_ms: int
    n_sessions: int
    n_ticks: int
    n_ticks_late: int
    shed_level: int
    max_shed_level: int
    max_lag_ms: float
    compiled: bool


class Ticker:
    """Harvests the due ranges of every session of one tick interval, in one batched call per tick."""

    def __init__(
        self,
        executor: Executor,
        interval_ms: int,
        *,
        scan_threads: int = 1,
        execs_reported: Callable[[], bool] = lambda: False,
    ) -> None:
        """``execs_reported``: whether process events tell the sessions about execs now (then
        the ticks skip the trackers' own once-a-second exec check)."""
        self.interval_ms = interval_ms
        self._execs_reported = execs_reported
        self._executor = executor
        self.scheduler = HeatScheduler(interval_ms)
        self._scanners = [BatchScanner() for _ in range(max(1, scan_threads))]
        self._parts_executor = ThreadPoolExecutor(len(self._scanners) - 1, "scan") if scan_threads > 1 else None
        self._sessions: dict[str, Tickable] = {}
        self._auto: dict[str, Tickable] = {}
        self._generations: dict[str, int] = {}
        self._touched: set[str] = set()
        self._busy: dict[str, int] = {}
        self._check_cursor = 0
        self._off_loop_cpu_ns = 0
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._scanned = asyncio.Event()
        self._scanned.set()

    def add(self, session: Tickable) -> None:
        """Harvest ``session`` from the next tick on (it was just harvested in full)."""
        tracker = session.tracker
        if tracker is None:
            return
        self._sessions[session.session_id] = session
        if tracker.auto:
            self._auto[session.session_id] = session
        self._generations[session.session_id] = tracker.ranges_generation
        self.scheduler.add(
            session.session_id, tracker.pagemap_fd, tracker.tracked, max_staleness_ms=session.max_staleness_ms
        )
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"ticker-{self.interval_ms}ms")

    async def discard(self, session: Tickable) -> None:
        """Stop harvesting ``session``; returns once no scan in flight uses its tracker."""
        self._sessions.pop(session.session_id, None)
        self._auto.pop(session.session_id, None)
        self._generations.pop(session.session_id, None)
        self.scheduler.remove(session.session_id)
        await self._scanned.wait()

    @contextlib.asynccontextmanager
    async def exclusive(self, session: Tickable) -> AsyncIterator[None]:
        """Keep ``session`` out of the ticks while the block runs (after a tick in flight has published)."""
        key = session.session_id
        self._busy[key] = self._busy.get(key, 0) + 1
        try:
            await self._idle.wait()
            yield
        finally:
            self._busy[key] -= 1
            if not self._busy[key]:
                del self._busy[key]
            if key in self._sessions:
                self._sync_ranges(session)

    def _sync_ranges(self, session: Tickable) -> None:
        """After the tracker may have changed its ranges: reschedule them at once (a tick must
        never scan a range that is no longer registered: the failed scan would report it
        written), and let the next tick report newly tracked ranges."""
        tracker = session.tracker
        if tracker is None:
            return
        key = session.session_id
        if tracker.ranges_generation != self._generations.get(key):
            self._generations[key] = tracker.ranges_generation
            self.scheduler.set_ranges(key, tracker.tracked)
        if tracker.has_pending:
            self._touched.add(key)

    def replace(self, session: Tickable) -> None:
        """``session`` has a new tracker (a followed exec): schedule its ranges afresh."""
        if session.session_id in self._sessions:
            self.scheduler.remove(session.session_id)
            self._sessions.pop(session.session_id)
            self._auto.pop(session.session_id, None)
            self.add(session)

    def note_full_scan(self, session: Tickable, regions: RegionArray, started_ns: int) -> None:
        """A full harvest of ``session`` started at ``started_ns`` (monotonic) found ``regions``."""
        self.scheduler.note_full_scan(session.session_id, regions, started_ns)

    def statistics(self) -> TickerStatistics:
        """Current counters."""
        scheduler = self.scheduler
        return TickerStatistics(
            self.interval_ms,
            len(self._sessions),
            scheduler.n_ticks,
            scheduler.n_ticks_late,
            scheduler.shed_level,
            scheduler.max_shed_level_seen,
            scheduler.max_lag_ms(),
            self._scanners[0].compiled,
        )

    async def stop(self) -> None:
        """Cancel the tick loop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._parts_executor is not None:
            self._parts_executor.shutdown(wait=False)

    async def _run(self) -> None:
        interval_ns = self.interval_ms * 1_000_000
        next_tick_ns = time.monotonic_ns()
        # The daemon's own load, which alone moves the shed level: CPU time of the event loop's
        # thread (ticks, deliveries, RPCs) plus the ticks' work in other threads, per wall time.
        mark_ns, mark_cpu_ns = next_tick_ns, time.thread_time_ns()
        while self._sessions:
            # The first tick comes one interval after the start: a session just created (and
            # harvested) must not lose its caller's first writes to an immediate tick.
            next_tick_ns += interval_ns
            delay_ns = next_tick_ns - time.monotonic_ns()
            if delay_ns > 0:
                await asyncio.sleep(delay_ns / 1e9)
            started_ns = time.monotonic_ns()
            late_ns = max(0, started_ns - next_tick_ns)
            if late_ns > interval_ns:
                next_tick_ns = started_ns  # fell behind: do not burst to catch up
            await self._step(self._tick(late_ns))
            # The cooler chunks half an interval later: their walk (and its thread) stays away
            # from the delivery of the hot writes this tick just published.
            delay_ns = next_tick_ns + interval_ns // 2 - time.monotonic_ns()
            if delay_ns > 0 and not self.scheduler.every_tick_only:
                await asyncio.sleep(delay_ns / 1e9)
            await self._step(self._scan_and_publish(Tier.REST, late_ns, frozenset(), {}))
            now_ns, now_cpu_ns = time.monotonic_ns(), time.thread_time_ns()
            busy_ns = now_cpu_ns - mark_cpu_ns + self._off_loop_cpu_ns
            self.scheduler.note_tick(late_ns, busy_ns, now_ns - mark_ns)
            mark_ns, mark_cpu_ns, self._off_loop_cpu_ns = now_ns, now_cpu_ns, 0

    async def _step(self, work: Coroutine[None, None, None]) -> None:
        """Run one step of a tick; on-demand harvests wait for it (``_idle``)."""
        self._idle.clear()
        try:
            await work
        except Exception:
            # A tick must never stop the ticks of every session: log, and tick again.
            log.exception("tick of the %d ms interval failed", self.interval_ms)
        finally:
            self._idle.set()

    async def _tick(self, late_ns: int) -> None:
        outcomes: dict[str, Published | BaseException | None] = {}
        self._check_some(outcomes)
        await self._scan_and_publish(Tier.EVERY_TICK, late_ns, frozenset(outcomes), outcomes)

    async def _scan_and_publish(
        self,
        tier: Tier,
        late_ns: int,
        skip: frozenset[str],
        outcomes: dict[str, Published | BaseException | None],
    ) -> None:
        """Plan ``tier`` of the tick, scan it, settle and publish what it found (and ``outcomes``).

        A long first tier of hot chunks is scanned in up to :data:`_MAX_PARTS` parts, each
        published while the next one scans: a hot write waits for the scan of its part, not of
        the whole tier. (Not when every chunk is scanned every tick, ``max_staleness_ms`` 0:
        that tier is all the memory, not the hot part of it.)
        """
        # No await between the plan and clearing _scanned: a session discarded meanwhile is not in the plan.
        plan = self.scheduler.plan(late_ns=late_ns, skip=frozenset(self._busy) | skip, tier=tier)
        failures: dict[str, Published | BaseException | None] = {}
        if len(plan) or self._touched:
            loop = asyncio.get_running_loop()
            n_pages = plan.requests.n_pages
            parts = [plan]
            if tier is Tier.EVERY_TICK and n_pages > _INLINE_MAX_PAGES and not self.scheduler.every_tick_only:
                parts = self.scheduler.split(plan, max(_INLINE_MAX_PAGES, -(-n_pages // _MAX_PARTS)))
            self._scanned.clear()
            pending: asyncio.Future[BatchResult] | None = None
            try:
                if n_pages > _INLINE_MAX_PAGES:
                    pending = loop.run_in_executor(self._executor, self._off_loop, self._scan, parts[0])
                for index, part in enumerate(parts):
                    result = self._scan(part) if pending is None else await pending
                    if index + 1 < len(parts):
                        pending = loop.run_in_executor(self._executor, self._off_loop, self._scan, parts[index + 1])
                    work = self._gather(part, result)
                    found: dict[str, Published | BaseException | None] = dict(outcomes) if index == 0 else {}
                    if work:
                        if len(result.regions) <= _INLINE_MAX_REGIONS:
                            found.update(self._settle(work))
                        else:
                            found.update(await loop.run_in_executor(self._executor, self._off_loop, self._settle, work))
                    # Deltas now; failures once no scan is in flight (ending a session waits for that).
                    for key, outcome in found.items():
                        if isinstance(outcome, BaseException):
                            failures[key] = outcome
                        else:
                            await self._complete(key, outcome)
            finally:
                if pending is not None:
                    # A failure between parts must not end a session while its next part still scans.
                    await asyncio.gather(pending, return_exceptions=True)
                self._scanned.set()
        else:
            failures = outcomes
        for key, outcome in failures.items():
            await self._complete(key, outcome)

    async def _complete(self, key: str, outcome: Published | BaseException | None) -> None:
        session = self._sessions.get(key)
        if session is not None and outcome is not None:
            await session.complete_harvest(outcome)

    def _check_some(self, outcomes: dict[str, Published | BaseException | None]) -> None:
        """The exec check and auto ranges of a slice of the sessions, so each comes up about once a second.

        With process events reporting execs, only the sessions that follow ``/proc/PID/maps``
        need it (the others cost nothing here).
        """
        exec_check = not self._execs_reported()
        sessions = list(self._sessions.values()) if exec_check else [s for s in self._auto.values()]
        if not sessions:
            return
        n = min(len(sessions), -(-len(sessions) * self.interval_ms // 1000))
        now_ns = time.perf_counter_ns()
        for offset in range(n):
            session = sessions[(self._check_cursor + offset) % len(sessions)]
            key = session.session_id
            tracker = session.tracker
            if tracker is None or key in self._busy:
                continue
            try:
                tracker.check(now_ns, exec_check=exec_check)
            except ProcessGone as exc:
                outcomes[key] = exc
                continue
            self._sync_ranges(session)
        self._check_cursor = (self._check_cursor + n) % len(sessions)

    def _off_loop(self, function: Callable[[_T], _R], argument: _T) -> _R:
        """``function(argument)`` in a worker thread, its CPU time counted in the daemon's load."""
        started_ns = time.thread_time_ns()
        try:
            return function(argument)
        finally:
            self._off_loop_cpu_ns += time.thread_time_ns() - started_ns

    def _scan(self, plan: TickPlan) -> BatchResult:
        result = harvest_parallel(self._scanners, plan.requests, self._parts_executor)
        self.scheduler.complete(plan, result)
        return result

    def _gather(self, plan: TickPlan, result: BatchResult) -> dict[str, _Work]:
        """What each session with something to publish gets from this tick."""
        work: dict[str, _Work] = {}
        news = result.news
        if len(news):
            by_key: defaultdict[Hashable, list[int]] = defaultdict(list)
            for index, key in enumerate(plan.request_keys):
                by_key[key].append(index)
            array = plan.requests.array
            for index in news.tolist():
                key = str(plan.request_keys[index])
                item = work.get(key)
                if item is None:
                    mine = by_key[key]
                    item = work[key] = _Work(as_regions(np.column_stack((array["start"][mine], array["end"][mine]))))
                error = int(result.errors[index])
                if error:
                    item.failed.append((int(array["start"][index]), int(array["end"][index]), error))
                else:
                    item.found.append(result.regions_of(index))
        for key in self._touched - set(self._busy):
            if key not in work and key in self._sessions:
                work[key] = _Work(EMPTY)  # nothing scanned: only its newly tracked ranges to report
        self._touched &= set(self._busy)
        return work

    def _settle(self, work: dict[str, _Work]) -> dict[str, Published | BaseException | None]:
        outcomes: dict[str, Published | BaseException | None] = {}
        for key, item in work.items():
            session = self._sessions.get(key)
            if session is None or session.tracker is None:
                continue
            tracker = session.tracker
            covered: RegionArray | None = item.covered
            if n_bytes(merge(item.covered)) >= n_bytes(tracker.tracked):
                covered = None  # every tracked range was scanned
            try:
                outcomes[key] = session.settle_tick(item.found, item.failed, covered)
            except Exception as exc:
                outcomes[key] = exc
            if tracker.ranges_generation != self._generations.get(key):
                self._generations[key] = tracker.ranges_generation
                self.scheduler.set_ranges(key, tracker.tracked)  # a lost range re-registered
        return outcomes


@dataclass(slots=True)
class _Work:
    """One session's share of a tick: what its requests found, which failed, and what they covered."""

    covered: RegionArray
    found: list[RegionArray] = field(default_factory=list)
    failed: list[tuple[int, int, int]] = field(default_factory=list)
