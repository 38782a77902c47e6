"""Heat-scheduled scanning: which tracked ranges a tick scans (docs/api.md, "Heat scheduling").

The kernel keeps every written bit until a scan takes it, so scanning a range less often never
loses a write, it only delays it. A :class:`HeatScheduler` serves the sessions of one tick
interval. Each session's tracked memory is cut into chunks with a temperature: the fraction
of their pages found written, decayed with a half-life. Each tick it plans the chunks that
are due:

- hot chunks (``heat >= hot_fraction``) every tick;
- warm chunks every ``warm_every_ticks``-th tick;
- cold chunks (idle sessions are cold everywhere) so that no write waits longer than the
  session's ``max_staleness_ms`` (a bound of one tick or less scans everything every tick).

A tick may take its plan in two tiers (:class:`Tier`): first the chunks due every tick (the
hot ones), whose writes the caller publishes at once, then the rest, so that a tick's walk of
cooler chunks never delays the hot writes (the daemon's ticker scans the rest half an
interval later).

When the daemon's own work no longer fits the ticks (the caller reports, with
:meth:`HeatScheduler.note_tick`, each tick's lateness and the CPU time the daemon spent since
the previous one), it sheds load by a level: level 1 scans warm chunks as cold ones, each
further level doubles the hot interval, never beyond the staleness bound. A tick that starts
late because the machine ran something else sheds nothing (it is counted late): scanning less
would free the daemon's time, which is not what is short then. Every
chunk becomes due once its age reaches its interval, so no session starves; how far behind
the nominal schedule each session is (its lag) is in :meth:`HeatScheduler.statistics`.

All state is numpy arrays over the chunks of every session, sorted by session then address,
so a tick's plan and its bookkeeping cost a few vectorised passes whatever the number of
sessions; Python touches a session only when its scan found something. Thread-safe (one lock).
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..kernel.batchscan import BatchRequests, BatchResult
from ..kernel.pagemap import PAGE_SIZE
from .regions import RegionArray, merge

__all__ = [
    "DEFAULT_MAX_STALENESS_MS",
    "MAX_STALENESS_MS",
    "HeatPolicy",
    "HeatScheduler",
    "HeatStatistics",
    "Temperature",
    "TickPlan",
    "Tier",
    "pages_per_chunk",
]

DEFAULT_MAX_STALENESS_MS = 1000
#: The largest staleness bound a session may ask for (an hour, as the longest tick).
MAX_STALENESS_MS = 3_600_000
_MIB = 1 << 20
_NS_PER_MS = 1_000_000


class Temperature(enum.IntEnum):
    """How often a chunk is scanned."""

    COLD = 0
    WARM = 1
    HOT = 2


class Tier(enum.Enum):
    """Which of the due chunks a tick's plan takes."""

    #: Every due chunk.
    ALL = "all"
    #: Only those scanned every tick (hot ones, at the current shed level): planned first, counted for the tick.
    EVERY_TICK = "every tick"
    #: The others (warm, cold, pulled early), planned after the tick published the first tier.
    REST = "rest"


@dataclass(frozen=True, slots=True)
class HeatPolicy:
    """The scheduler's knobs (the defaults are the daemon's)."""

    #: A chunk at or above this fraction of its pages written (decayed) is hot.
    hot_fraction: float = 1 / 64
    #: At or above this it is warm; below, cold.
    warm_fraction: float = 1 / 16384
    #: Warm chunks are scanned every this many ticks.
    warm_every_ticks: int = 4
    #: Half-life of a chunk's heat.
    half_life_ms: int = 1000
    #: Smallest chunk; a session's chunks grow (powers of two) to keep at most ``max_chunks``.
    min_chunk_bytes: int = 2 * _MIB
    max_chunks: int = 4096
    #: Shed level up when the daemon's load (its CPU time per wall time between ticks,
    #: smoothed over about 1 / ``load_smoothing`` ticks, half a second at 50 ms) exceeds this:
    #: its event loop is then so busy that ticks and deliveries queue behind each other...
    overload_fraction: float = 0.9
    #: ...and down after ``calm_ticks`` ticks in a row below ``calm_fraction``. Not much lower:
    #: part of the load does not shrink with the level (calls, the ticks themselves), and a
    #: level that sheds to 60 % must not stay up for good.
    calm_fraction: float = 0.6
    calm_ticks: int = 20
    load_smoothing: float = 0.1
    #: A tick that scans anyway takes at most this many cold chunks (and pages) early.
    pull_max_chunks: int = 64
    pull_max_pages: int = 1 << 16


@dataclass(frozen=True, slots=True)
class HeatStatistics:
    """One session's scheduling, as of its last tick."""

    max_staleness_ms: int
    n_chunks: int
    n_hot_pages: int
    n_warm_pages: int
    n_cold_pages: int
    #: How far behind its nominal schedule the session's most overdue chunk is.
    lag_ms: float
    max_lag_ms: float
    #: Ticks at which the session had a chunk due, and of those, ticks served late (shed or a late tick).
    n_ticks_due: int
    n_ticks_late: int
    #: Chunk scans planned by ticks (not counting full harvests), and ticks that scanned any.
    n_chunk_scans: int
    n_scanned_ticks: int
    #: The scheduler's shed level (0: nominal; shared by the sessions of the tick interval).
    shed_level: int


@dataclass(frozen=True, slots=True)
class TickPlan:
    """What one tick scans: :attr:`requests` (adjacent due chunks of a session coalesced).

    ``request_keys[i]`` is the session of request ``i``; its chunks are
    ``chunk_first[i] .. chunk_first[i] + chunk_count[i] - 1``.
    """

    now_ns: int
    requests: BatchRequests
    request_keys: npt.NDArray[np.object_]
    chunk_first: npt.NDArray[np.int64]
    chunk_count: npt.NDArray[np.int64]
    chunks: npt.NDArray[np.int64]
    generation: int

    def __len__(self) -> int:
        return len(self.requests)


def pages_per_chunk(
    starts: npt.NDArray[np.uint64], ends: npt.NDArray[np.uint64], regions: RegionArray
) -> npt.NDArray[np.int64]:
    """Pages of ``regions`` (sorted, disjoint) inside each chunk ``[starts[i], ends[i])`` (sorted, disjoint)."""
    if len(regions) == 0 or len(starts) == 0:
        return np.zeros(len(starts), dtype=np.int64)
    region_starts = regions[:, 0].astype(np.int64)
    region_ends = regions[:, 1].astype(np.int64)
    cumulative = np.concatenate(([0], np.cumsum(region_ends - region_starts)))

    def below(points: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Written bytes below each point."""
        index = np.searchsorted(region_starts, points, side="right")
        total = cumulative[index]
        inside = index > 0
        overshoot = np.zeros_like(points)
        overshoot[inside] = np.maximum(region_ends[index[inside] - 1] - points[inside], 0)
        result: npt.NDArray[np.int64] = total - overshoot
        return result

    written = below(ends.astype(np.int64)) - below(starts.astype(np.int64))
    return written // PAGE_SIZE


_COUNTERS = ("lag_ns", "max_lag_ns", "n_ticks_due", "n_ticks_late", "n_chunk_scans", "n_scanned_ticks")


@dataclass(slots=True)
class _Session:
    key: Hashable
    fd: int
    ranges: RegionArray
    max_staleness_ns: int
    chunk_bytes: int = 0
    first: int = 0
    count: int = 0
    #: Its row in the scheduler's per-session counters (-1: it has no chunks).
    row: int = -1
    #: Counters saved across a rebuild (in the order of _COUNTERS).
    saved: tuple[int, ...] = (0,) * len(_COUNTERS)


def _chunk_bytes(ranges: RegionArray, policy: HeatPolicy) -> int:
    total = int((ranges[:, 1] - ranges[:, 0]).sum()) if len(ranges) else 0
    size = policy.min_chunk_bytes
    while total // size > policy.max_chunks:
        size *= 2
    return size


def _chunks(ranges: RegionArray, chunk_bytes: int) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """``ranges`` cut at the multiples of ``chunk_bytes`` (stable boundaries as ranges change)."""
    starts: list[npt.NDArray[np.uint64]] = []
    ends: list[npt.NDArray[np.uint64]] = []
    for start, end in ranges.tolist():
        first_cut = (start // chunk_bytes + 1) * chunk_bytes
        cuts = np.arange(first_cut, end, chunk_bytes, dtype=np.uint64) if first_cut < end else np.empty(0, np.uint64)
        starts.append(np.concatenate(([np.uint64(start)], cuts)))
        ends.append(np.concatenate((cuts, [np.uint64(end)])))
    if not starts:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    return np.concatenate(starts), np.concatenate(ends)


class HeatScheduler:
    """Plans the scans of the sessions of one tick interval (see the module docstring)."""

    def __init__(
        self,
        tick_interval_ms: int,
        *,
        policy: HeatPolicy | None = None,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.tick_interval_ms = tick_interval_ms
        self.policy = policy or HeatPolicy()
        self.clock = clock
        self._tick_ns = tick_interval_ms * _NS_PER_MS
        # Half a tick of slack: a chunk due "around now" is scanned now, not a tick later. Due
        # times are kept per chunk and refreshed when heat, age or level change, and as heat
        # decays (which only lengthens intervals, so a stale due time errs on scanning early).
        self._slack_ns = self._tick_ns + self._tick_ns // 2
        self._refresh_every_ns = self.policy.half_life_ms * _NS_PER_MS // 4
        self._due_refreshed_ns = 0
        self._lock = threading.Lock()
        self._sessions: dict[Hashable, _Session] = {}
        self._order: list[_Session] = []
        self._dirty = False
        self._generation = 0
        self.shed_level = 0
        self.load = 0.0
        """The ticks' smoothed load: lateness or work as a fraction of the interval."""
        self._calm_run = 0
        self.max_shed_level_seen = 0
        self.n_ticks = 0
        self.n_ticks_late = 0
        self._empty_tables()
        self._counters = np.zeros((0, len(_COUNTERS)), np.int64)
        self._keys = np.empty(0, dtype=object)
        self._full_plan: TickPlan | None = None
        self._chunks_per_row = np.empty(0, np.int64)

    def _empty_tables(self) -> None:
        self._session_of = np.empty(0, np.int64)
        self._fd = np.empty(0, np.int32)
        self._start = np.empty(0, np.uint64)
        self._end = np.empty(0, np.uint64)
        self._n_pages = np.empty(0, np.float64)
        self._heat = np.empty(0, np.float64)
        self._heat_ns = np.empty(0, np.int64)
        self._last_scan_ns = np.empty(0, np.int64)
        self._staleness_ns = np.empty(0, np.int64)
        self._due_ns = np.empty(0, np.int64)
        self._nominal_due_ns = np.empty(0, np.int64)
        self._pull_ns = np.empty(0, np.int64)
        self._every_tick = np.empty(0, bool)
        self._first_due_ns = 0
        self._row_of = np.empty(0, np.int64)

    # -- sessions

    def add(self, key: Hashable, fd: int, ranges: RegionArray, *, max_staleness_ms: int, scanned: bool = True) -> None:
        """Schedule a session's ranges (``scanned``: a full harvest just ran, so nothing is due yet)."""
        with self._lock:
            self._sessions[key] = _Session(key, fd, merge(ranges), max(0, max_staleness_ms) * _NS_PER_MS)
            self._rebuild(fresh={key: self.clock() if scanned else 0})

    def remove(self, key: Hashable) -> None:
        """Stop scheduling a session."""
        with self._lock:
            if self._sessions.pop(key, None) is not None:
                self._rebuild()

    def set_ranges(self, key: Hashable, ranges: RegionArray) -> None:
        """The session tracks these ranges now; chunks that stay keep their heat and age, new ones are due at once."""
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return
            session.ranges = merge(ranges)
            self._rebuild()

    def set_max_staleness(self, key: Hashable, max_staleness_ms: int) -> None:
        """Change a session's staleness bound."""
        with self._lock:
            session = self._sessions.get(key)
            if session is not None:
                session.max_staleness_ns = max(0, max_staleness_ms) * _NS_PER_MS
                self._rebuild()

    @property
    def every_tick_only(self) -> bool:
        """Whether every chunk is scanned every tick (every bound is a tick or less): no :attr:`Tier.REST`."""
        return self._full_plan is not None

    def __contains__(self, key: object) -> bool:
        return key in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def _rebuild(self, fresh: dict[Hashable, int] | None = None) -> None:
        """Re-cut every session's chunks, carrying heat and last scan over by address."""
        self._save_counters()
        old = (self._session_of, self._start, self._heat, self._heat_ns, self._last_scan_ns)
        old_index = {id(s): i for i, s in enumerate(self._order)}
        order = list(self._sessions.values())
        columns: dict[str, list[npt.NDArray[np.generic]]] = {
            name: [] for name in ("sid", "fd", "start", "end", "heat", "heat_ns", "last", "stale")
        }
        position = 0
        for index, session in enumerate(order):
            session.chunk_bytes = _chunk_bytes(session.ranges, self.policy)
            starts, ends = _chunks(session.ranges, session.chunk_bytes)
            n = len(starts)
            heat = np.zeros(n, np.float64)
            heat_ns = np.zeros(n, np.int64)
            last = np.zeros(n, np.int64)
            if fresh is not None and session.key in fresh:
                last[:] = fresh[session.key] - self._stagger(n, session.max_staleness_ns)
            elif id(session) in old_index and n:
                # Chunks of the same start carry over; a new chunk keeps age 0 scans (due now).
                mine = old[0] == old_index[id(session)]
                old_starts = old[1][mine]
                where = np.searchsorted(old_starts, starts)
                found = (where < len(old_starts)) & (old_starts[np.minimum(where, len(old_starts) - 1)] == starts)
                source = np.flatnonzero(mine)[where[found]]
                heat[found] = old[2][source]
                heat_ns[found] = old[3][source]
                last[found] = old[4][source]
            columns["sid"].append(np.full(n, index, np.int64))
            columns["fd"].append(np.full(n, session.fd, np.int32))
            columns["start"].append(starts)
            columns["end"].append(ends)
            columns["heat"].append(heat)
            columns["heat_ns"].append(heat_ns)
            columns["last"].append(last)
            columns["stale"].append(np.full(n, session.max_staleness_ns, np.int64))
            session.first, session.count = position, n
            position += n
        self._order = order
        self._keys = np.empty(len(order), dtype=object)
        self._keys[:] = [session.key for session in order]
        if not order:
            self._empty_tables()
        else:
            self._session_of = np.concatenate(columns["sid"]).astype(np.int64)
            self._fd = np.concatenate(columns["fd"]).astype(np.int32)
            self._start = np.concatenate(columns["start"]).astype(np.uint64)
            self._end = np.concatenate(columns["end"]).astype(np.uint64)
            self._n_pages = ((self._end - self._start) // np.uint64(PAGE_SIZE)).astype(np.float64)
            self._heat = np.concatenate(columns["heat"]).astype(np.float64)
            self._heat_ns = np.concatenate(columns["heat_ns"]).astype(np.int64)
            self._last_scan_ns = np.concatenate(columns["last"]).astype(np.int64)
            self._staleness_ns = np.concatenate(columns["stale"]).astype(np.int64)
        # Per-session counters, one row per session that has chunks (what reduceat yields).
        owners = [session for session in order if session.count]
        for row, session in enumerate(owners):
            session.row = row
        self._row_of = np.repeat(np.arange(len(owners), dtype=np.int64), [session.count for session in owners])
        self._counters = np.array([session.saved for session in owners], np.int64).reshape(len(owners), len(_COUNTERS))
        self._due_ns = np.zeros(len(self._start), np.int64)
        self._nominal_due_ns = np.zeros(len(self._start), np.int64)
        self._pull_ns = np.zeros(len(self._start), np.int64)
        self._every_tick = np.zeros(len(self._start), bool)
        self._refresh_due(self.clock())
        self._generation += 1
        # Naive scanning (every bound a tick or less, max_staleness_ms=0): the same plan every tick.
        self._chunks_per_row = np.array([session.count for session in owners], np.int64)
        every_tick = bool(owners) and all(s.max_staleness_ns <= self._tick_ns for s in order)
        self._full_plan = self._plan_of(np.arange(len(self._start)), 0) if every_tick else None

    def _save_counters(self) -> None:
        for session in self._order:
            if session.row >= 0:
                session.saved = tuple(self._counters[session.row].tolist())
            session.row = -1

    # -- temperatures and intervals

    def _heat_at(self, now_ns: int, index: npt.NDArray[np.int64] | slice = slice(None)) -> npt.NDArray[np.float64]:
        elapsed = np.maximum(now_ns - self._heat_ns[index], 0).astype(np.float64)
        decayed: npt.NDArray[np.float64] = self._heat[index] * np.exp2(
            -elapsed / (self.policy.half_life_ms * _NS_PER_MS)
        )
        return decayed

    def _temperatures(self, heat: npt.NDArray[np.float64]) -> npt.NDArray[np.int8]:
        policy = self.policy
        temperature = np.zeros(len(heat), np.int8)
        temperature[heat >= policy.warm_fraction] = Temperature.WARM
        temperature[heat >= policy.hot_fraction] = Temperature.HOT
        return temperature

    def _intervals(
        self, temperature: npt.NDArray[np.int8], level: int, staleness: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        """Scan interval of each chunk at shed ``level`` (capped by its staleness bound)."""
        tick = self._tick_ns
        hot = tick << max(0, level - 1)
        warm = staleness if level >= 1 else np.int64(tick * self.policy.warm_every_ticks)
        intervals = np.where(
            temperature == Temperature.HOT, hot, np.where(temperature == Temperature.WARM, warm, staleness)
        )
        # A bound of a tick or less: every tick.
        result: npt.NDArray[np.int64] = np.maximum(np.minimum(intervals, staleness), tick)
        return result

    # -- ticks

    def plan(
        self,
        now_ns: int | None = None,
        *,
        late_ns: int = 0,
        skip: frozenset[Hashable] = frozenset(),
        tier: Tier = Tier.ALL,
    ) -> TickPlan:
        """The requests of this tick, which started ``late_ns`` late (sessions in ``skip`` wait for the next).

        A tick counts once (lag, ticks due and late): in the plan of :attr:`Tier.ALL` or
        :attr:`Tier.EVERY_TICK`; a plan of :attr:`Tier.REST` follows one of those.
        """
        with self._lock:
            now = self.clock() if now_ns is None else now_ns
            n = len(self._start)
            if n == 0:
                return _empty_plan(now, self._generation)
            counted = tier is not Tier.REST
            if self._full_plan is not None and not skip:
                return (
                    self._every_tick_plan(now, late_ns > self._tick_ns // 2)
                    if counted
                    else _empty_plan(now, self._generation)
                )
            if now - self._due_refreshed_ns >= self._refresh_every_ns:
                self._refresh_due(now)  # heat decayed: intervals only grow, so this can wait
            if now <= self._first_due_ns:  # nothing due (nominal due times come first)
                if counted:
                    self._counters[:, 0] = 0
                return _empty_plan(now, self._generation)
            nominal_due = now > self._nominal_due_ns
            due = now > self._due_ns
            self._pull_early(now, due)
            if counted:
                self._note_sessions(now, due, nominal_due, late_ns > self._tick_ns // 2)
            if skip:
                for key in skip:
                    session = self._sessions.get(key)
                    if session is not None:
                        due[session.first : session.first + session.count] = False
            if tier is Tier.EVERY_TICK:
                due &= self._every_tick
            elif tier is Tier.REST:
                due &= ~self._every_tick
            return self._plan_of(np.flatnonzero(due), now)

    def split(self, plan: TickPlan, max_pages: int) -> list[TickPlan]:
        """``plan`` cut at chunk boundaries into plans of about ``max_pages`` pages, in its order
        (each completes on its own; a plan of another generation stays whole)."""
        with self._lock:
            if plan.generation != self._generation or len(plan.chunks) <= 1:
                return [plan]
            pages = self._n_pages[plan.chunks]
            part = ((np.cumsum(pages) - pages) // max(1, max_pages)).astype(np.int64)
            bounds = np.flatnonzero(np.diff(part)) + 1
            if len(bounds) == 0:
                return [plan]
            return [self._plan_of(chunks, plan.now_ns) for chunks in np.split(plan.chunks, bounds)]

    def _pull_early(self, now_ns: int, due: npt.NDArray[np.bool_]) -> None:
        """Add to a tick that scans anyway the cold chunks that come due soonest, within a small budget.

        The cold scans of many small sessions then gather on a few ticks, and the ticks between
        find nothing due. The budget keeps the tick short: a big session's cold sweep stays
        spread over its ticks (its chunks' first scans are staggered for that).
        """
        candidates = np.flatnonzero((now_ns + self._pull_ns > self._due_ns) & ~due)
        if len(candidates) == 0:
            return
        policy = self.policy
        candidates = candidates[np.argsort(self._due_ns[candidates], kind="stable")][: policy.pull_max_chunks]
        within = np.cumsum(self._n_pages[candidates]) <= policy.pull_max_pages
        due[candidates[within]] = True

    def _stagger(self, n_chunks: int, staleness_ns: int) -> npt.NDArray[np.int64]:
        """How much older than it is to take each chunk's last scan, so that its chunks do not
        all come due on the same tick (taking a scan older is always safe: it comes due earlier).

        The chunks are cut into one run of adjacent chunks per tick of the span: a tick's share
        of the sweep is one request (one ioctl), not every n-th chunk in a request of its own.
        """
        n_ticks = (staleness_ns - 2 * self._tick_ns) // self._tick_ns
        if n_ticks <= 0 or n_chunks <= 1:
            return np.zeros(n_chunks, np.int64)
        offsets: npt.NDArray[np.int64] = (np.arange(n_chunks, dtype=np.int64) * n_ticks // n_chunks) * self._tick_ns
        return offsets

    def _plan_of(self, chunks: npt.NDArray[np.intp], now_ns: int) -> TickPlan:
        """The requests scanning ``chunks`` (sorted): adjacent chunks of a session in one request."""
        if len(chunks) == 0:
            return _empty_plan(now_ns, self._generation)
        # A due chunk continues the previous request when it is the next chunk of the same
        # session and starts where that one ends.
        continues = np.zeros(len(chunks), bool)
        if len(chunks) > 1:
            previous, current = chunks[:-1], chunks[1:]
            continues[1:] = (
                (current == previous + 1)
                & (self._session_of[current] == self._session_of[previous])
                & (self._start[current] == self._end[previous])
            )
        heads = np.flatnonzero(~continues)
        first = chunks[heads]
        last = chunks[np.append(heads[1:], len(chunks)) - 1]
        return TickPlan(
            now_ns,
            BatchRequests(self._fd[first], self._start[first], self._end[last]),
            self._keys[self._session_of[first]],
            first.astype(np.int64),
            (last - first + 1).astype(np.int64),
            chunks.astype(np.int64),
            self._generation,
        )

    def _every_tick_plan(self, now_ns: int, late: bool) -> TickPlan:
        """The plan when every session's bound is a tick or less: all chunks, built once per rebuild."""
        counters = self._counters
        counters[:, 0] = 0
        counters[:, 2] += 1
        if late:
            counters[:, 3] += 1
        counters[:, 4] += self._chunks_per_row
        counters[:, 5] += 1
        full = self._full_plan
        assert full is not None
        return dataclasses.replace(full, now_ns=now_ns)

    def _note_sessions(
        self, now_ns: int, due: npt.NDArray[np.bool_], nominal_due: npt.NDArray[np.bool_], late: bool
    ) -> None:
        """Per-session counters of this tick, from the (usually few) chunks that are due."""
        counters = self._counters
        n_rows = len(counters)
        counters[:, 0] = 0
        wanted = np.flatnonzero(nominal_due)
        if len(wanted) == 0:
            return
        rows = self._row_of[wanted]
        # Lag: how far past its nominal interval a chunk is (the due rule's slack removed);
        # usually no chunk is, so the per-session maximum runs over none.
        lag = now_ns - self._nominal_due_ns[wanted] - self._slack_ns
        behind = lag > 0
        if behind.any():
            np.maximum.at(counters[:, 0], rows[behind], lag[behind])
            np.maximum(counters[:, 1], counters[:, 0], out=counters[:, 1])
        was_due = np.bincount(rows, minlength=n_rows) > 0
        counters[:, 2] += was_due
        if late:
            counters[:, 3] += was_due
        elif self.shed_level:
            counters[:, 3] += np.bincount(self._row_of[nominal_due & ~due], minlength=n_rows) > 0
        scans = np.bincount(self._row_of[due], minlength=n_rows)
        counters[:, 4] += scans
        counters[:, 5] += scans > 0

    def _refresh_due(self, now_ns: int, index: npt.NDArray[np.int64] | slice = slice(None)) -> None:
        """When chunks come due, at the shed level and nominally, from their heat at ``now_ns``."""
        temperature = self._temperatures(self._heat_at(now_ns, index))
        last = self._last_scan_ns[index]
        staleness = self._staleness_ns[index]
        intervals = self._intervals(temperature, self.shed_level, staleness)
        self._due_ns[index] = last + intervals - self._slack_ns
        self._every_tick[index] = intervals <= self._tick_ns
        self._nominal_due_ns[index] = last + self._intervals(temperature, 0, staleness) - self._slack_ns
        # A chunk scanned at its staleness bound may go up to a quarter of it early, with
        # whatever else is due: the cold scans of many sessions gather on a few ticks, and
        # the ticks between them find nothing due (and cost next to nothing).
        self._pull_ns[index] = np.where(intervals >= staleness, staleness // 4, 0)
        if isinstance(index, slice) and index == slice(None):
            self._due_refreshed_ns = now_ns
        self._first_due_ns = int(self._nominal_due_ns.min()) if len(self._nominal_due_ns) else 0

    def complete(self, plan: TickPlan, result: BatchResult) -> None:
        """Record what a planned tick scanned and found (failed requests count as scanned)."""
        with self._lock:
            if plan.generation != self._generation or len(plan) == 0:
                return  # the chunks changed meanwhile: the heat of this tick is dropped, ages stay conservative
            full = self._full_plan is not None and plan.chunk_first is self._full_plan.chunk_first
            # Heat decays lazily (from heat_ns): only chunks that were written need an update.
            for index in result.news.tolist():
                first = int(plan.chunk_first[index])
                span = slice(first, first + int(plan.chunk_count[index]))
                written = pages_per_chunk(self._start[span], self._end[span], merge(result.regions_of(index)))
                self._heat[span] = self._heat_at(plan.now_ns, span) + written / self._n_pages[span]
                self._heat_ns[span] = plan.now_ns
            if full:  # every chunk, every tick: due times do not matter
                self._last_scan_ns[:] = plan.now_ns
                return
            self._last_scan_ns[plan.chunks] = plan.now_ns
            self._refresh_due(plan.now_ns, plan.chunks)

    def note_full_scan(self, key: Hashable, regions: RegionArray, started_ns: int) -> None:
        """A full harvest of the session (flush, harvest, view) that started at ``started_ns`` found ``regions``."""
        with self._lock:
            session = self._sessions.get(key)
            if session is None or session.count == 0:
                return
            span = slice(session.first, session.first + session.count)
            heat = self._heat_at(started_ns, span)
            written = pages_per_chunk(self._start[span], self._end[span], regions) if len(regions) else 0
            self._heat[span] = heat + written / self._n_pages[span]
            self._heat_ns[span] = started_ns
            staggered = started_ns - self._stagger(session.count, session.max_staleness_ns)
            self._last_scan_ns[span] = np.maximum(self._last_scan_ns[span], staggered)
            self._refresh_due(started_ns, np.arange(span.start, span.stop))

    def note_tick(self, late_ns: int, busy_ns: int, period_ns: int = 0) -> None:
        """A tick started ``late_ns`` late, and the daemon spent ``busy_ns`` of CPU time on its own
        work over the ``period_ns`` (default: one interval) since the previous one: moves the shed level.

        Only ``busy_ns`` moves it. Lateness counts a late tick: on a machine busy with other
        work (targets, consumers) the daemon is descheduled, and shedding would only delay
        writes without making the next tick any earlier.
        """
        policy = self.policy
        # Smoothed: one busy tick (a burst of RPCs, a full harvest) is noise, a run of them is overload.
        sample = busy_ns / max(period_ns, self._tick_ns)
        self.load += policy.load_smoothing * (sample - self.load)
        load = self.load
        self.n_ticks += 1
        if late_ns > self._tick_ns // 2:
            self.n_ticks_late += 1
        if load > policy.overload_fraction:
            self._calm_run = 0
            if self.shed_level < self._max_level():
                self.shed_level += 1
                self._refresh_level()
                self.max_shed_level_seen = max(self.max_shed_level_seen, self.shed_level)
                self.load = policy.overload_fraction  # give the new level a few ticks to show
        elif load < policy.calm_fraction:
            self._calm_run += 1
            if self._calm_run >= policy.calm_ticks and self.shed_level:
                self.shed_level -= 1
                self._refresh_level()
                self._calm_run = 0
        else:
            self._calm_run = 0

    def _refresh_level(self) -> None:
        with self._lock:
            if len(self._start):
                self._refresh_due(self.clock())

    def _max_level(self) -> int:
        """The level past which nothing more can be shed (hot intervals reach the largest bound)."""
        bound = max((s.max_staleness_ns for s in self._order), default=0)
        level = 1
        while (self._tick_ns << max(0, level - 1)) < bound:
            level += 1
        return level

    def statistics(self, key: Hashable) -> HeatStatistics | None:
        """One session's scheduling (None when it is not scheduled here)."""
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                return None
            span = slice(session.first, session.first + session.count)
            temperature = self._temperatures(self._heat_at(self.clock(), np.arange(span.start, span.stop)))
            pages = self._n_pages[span]
            counters = self._counters[session.row].tolist() if session.row >= 0 else list(session.saved)
            lag_ns, max_lag_ns, n_ticks_due, n_ticks_late, n_chunk_scans, n_scanned_ticks = counters
            return HeatStatistics(
                max_staleness_ms=session.max_staleness_ns // _NS_PER_MS,
                n_chunks=session.count,
                n_hot_pages=int(pages[temperature == Temperature.HOT].sum()),
                n_warm_pages=int(pages[temperature == Temperature.WARM].sum()),
                n_cold_pages=int(pages[temperature == Temperature.COLD].sum()),
                lag_ms=lag_ns / _NS_PER_MS,
                max_lag_ms=max_lag_ns / _NS_PER_MS,
                n_ticks_due=n_ticks_due,
                n_ticks_late=n_ticks_late,
                n_chunk_scans=n_chunk_scans,
                n_scanned_ticks=n_scanned_ticks,
                shed_level=self.shed_level,
            )

    def max_lag_ms(self) -> float:
        """The lag of the most overdue session as of the last tick."""
        return float(self._counters[:, 0].max()) / _NS_PER_MS if len(self._counters) else 0.0


def _empty_plan(now_ns: int, generation: int) -> TickPlan:
    nothing = np.empty(0, np.int64)
    return TickPlan(now_ns, BatchRequests([], [], []), np.empty(0, object), nothing, nothing, nothing, generation)
