"""The heat scheduler: its decisions with an injected clock, and exactness against a real target."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from targets import PAGE, CoopTarget
from writewatchd.kernel import PagemapScanner, Userfaultfd
from writewatchd.kernel.batchscan import BatchRequests, BatchResult, BatchScanner
from writewatchd.tracking.heat import HeatPolicy, HeatScheduler, TickPlan, Tier, pages_per_chunk
from writewatchd.tracking.regions import as_regions

TICK_MS = 50
MS = 1_000_000
CHUNK = 16 * PAGE
BASE = 1 << 30


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now_ns = 10**12

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, ms: float) -> None:
        self.now_ns += int(ms * MS)


def _scheduler(clock: Clock, **policy: object) -> HeatScheduler:
    return HeatScheduler(TICK_MS, policy=HeatPolicy(min_chunk_bytes=CHUNK, **policy), clock=clock)  # type: ignore[arg-type]


def _result(plan: TickPlan, found: dict[int, list[tuple[int, int]]]) -> BatchResult:
    """A batch result of ``plan`` where the request covering each address in ``found`` reports those regions."""
    per_request: list[list[tuple[int, int]]] = [[] for _ in range(len(plan))]
    array = plan.requests.array
    for _, regions in found.items():
        for start, end in regions:
            index = int(np.flatnonzero((array["start"] <= start) & (array["end"] >= end))[0])
            per_request[index].append((start, end))
    counts = [len(r) for r in per_request]
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    rows = [row for r in per_request for row in r]
    return BatchResult(as_regions(rows), offsets, np.zeros(len(plan), np.int32))


def _scanned(plan: TickPlan) -> set[int]:
    """Chunk indices (0-based from BASE, CHUNK-sized) that the plan scans."""
    chunks: set[int] = set()
    for start, end in zip(plan.requests.array["start"].tolist(), plan.requests.array["end"].tolist(), strict=True):
        chunks |= set(range((start - BASE) // CHUNK, (end - BASE) // CHUNK))
    return chunks


class FakeKernel:
    """Written pages kept until a scan of their chunk takes them, as the kernel keeps them."""

    def __init__(self) -> None:
        self.pending: set[int] = set()

    def write(self, regions: list[tuple[int, int]]) -> None:
        for start, end in regions:
            self.pending |= set(range((start - BASE) // PAGE, (end - BASE) // PAGE))

    def take(self, chunks: set[int]) -> list[tuple[int, int]]:
        taken = sorted(p for p in self.pending if p * PAGE // CHUNK in chunks)
        self.pending -= set(taken)
        return [(BASE + p * PAGE, BASE + (p + 1) * PAGE) for p in taken]


def _tick(
    scheduler: HeatScheduler,
    clock: Clock,
    writes: list[tuple[int, int]] | None = None,
    kernel: FakeKernel | None = None,
) -> set[int]:
    kernel = kernel or FakeKernel()
    kernel.write(writes or [])
    clock.advance(TICK_MS)
    plan = scheduler.plan()
    scanned = _scanned(plan)
    scheduler.complete(plan, _result(plan, {0: kernel.take(scanned)}))
    return scanned


def test_pages_per_chunk_counts_regions_across_chunk_boundaries() -> None:
    starts = np.array([0, 4, 8], np.uint64) * PAGE
    ends = np.array([4, 8, 12], np.uint64) * PAGE
    regions = as_regions([(1 * PAGE, 6 * PAGE), (7 * PAGE, 9 * PAGE), (11 * PAGE, 12 * PAGE)])
    assert pages_per_chunk(starts, ends, regions).tolist() == [3, 3, 2]


def test_an_idle_session_is_cold_everywhere_and_scanned_within_its_bound() -> None:
    clock = Clock()
    scheduler = _scheduler(clock)
    scheduler.add("s", 3, as_regions([(BASE, BASE + 8 * CHUNK)]), max_staleness_ms=1000)
    last_scan = {chunk: clock.now_ns for chunk in range(8)}
    n_scans = 0
    for _ in range(200):
        scanned = _tick(scheduler, clock)
        for chunk in scanned:
            assert clock.now_ns - last_scan[chunk] <= 1000 * MS
            last_scan[chunk] = clock.now_ns
            n_scans += 1
        assert all(clock.now_ns - t <= 1000 * MS for t in last_scan.values())
    # 200 ticks of 50 ms = 10 s: about one scan per chunk and second, not one per tick.
    assert 8 * 9 <= n_scans <= 8 * 12
    stats = scheduler.statistics("s")
    assert stats is not None and stats.n_hot_pages == 0 and stats.n_cold_pages == 8 * 16


def test_hot_chunks_every_tick_warm_every_kth_then_they_cool() -> None:
    clock = Clock()
    scheduler = _scheduler(clock, warm_every_ticks=4, half_life_ms=200, hot_fraction=0.25)
    scheduler.add("s", 3, as_regions([(BASE, BASE + 8 * CHUNK)]), max_staleness_ms=1000)
    for _ in range(25):  # everything scanned once (cold bound)
        _tick(scheduler, clock)
    hot = [(BASE + 2 * CHUNK, BASE + 2 * CHUNK + 8 * PAGE)]  # half of chunk 2 each tick
    warm = [(BASE + 5 * CHUNK, BASE + 5 * CHUNK + PAGE)]  # one page of chunk 5, rarely
    kernel = FakeKernel()
    scans = {2: 0, 5: 0, 7: 0}
    for tick in range(60):  # the cold chunks' next scan (at the bound) finds the first writes
        writes = hot + (warm if tick % 8 == 0 else [])
        scanned = _tick(scheduler, clock, writes, kernel)
        for chunk in scans:
            scans[chunk] += tick >= 30 and chunk in scanned
    assert scans[2] == 30  # hot: every tick
    assert 5 <= scans[5] <= 12  # warm: about every 4th tick
    assert scans[7] <= 2  # cold: at the bound
    stats = scheduler.statistics("s")
    assert stats is not None and stats.n_hot_pages == 16
    for _ in range(100):  # 5 s without writes: 25 half-lives
        _tick(scheduler, clock)
    cooled = scheduler.statistics("s")
    assert cooled is not None and cooled.n_hot_pages == 0 and cooled.n_warm_pages == 0


def test_a_fresh_idle_sessions_sweep_is_one_run_of_adjacent_chunks_per_tick() -> None:
    clock = Clock()
    scheduler = _scheduler(clock)
    scheduler.add("s", 3, as_regions([(BASE, BASE + 64 * CHUNK)]), max_staleness_ms=1000)
    seen: set[int] = set()
    for _ in range(20):
        clock.advance(TICK_MS)
        plan = scheduler.plan()
        assert len(plan) <= 1  # one ioctl per tick for its share of the sweep
        seen |= _scanned(plan)
        scheduler.complete(plan, _result(plan, {}))
    assert seen == set(range(64))


def test_every_tick_tier_then_the_rest_scan_what_one_plan_would() -> None:
    """A tick planned in two tiers takes the hot chunks first, then the other due ones: together
    the chunks one plan of everything takes, and the tick counted once."""
    clocks = [Clock(), Clock()]
    schedulers = [_scheduler(clock, warm_every_ticks=4, half_life_ms=200, hot_fraction=0.25) for clock in clocks]
    hot = [(BASE + 2 * CHUNK, BASE + 2 * CHUNK + 8 * PAGE)]
    warm = [(BASE + 5 * CHUNK, BASE + 5 * CHUNK + PAGE)]
    kernels = [FakeKernel(), FakeKernel()]
    for scheduler in schedulers:
        scheduler.add("s", 3, as_regions([(BASE, BASE + 8 * CHUNK)]), max_staleness_ms=1000)
    n_split = 0
    for tick in range(80):
        writes = hot + (warm if tick % 8 == 0 else [])
        whole = _tick(schedulers[0], clocks[0], writes, kernels[0])
        kernels[1].write(writes)
        clocks[1].advance(TICK_MS)
        tiers = []
        for tier in (Tier.EVERY_TICK, Tier.REST):
            plan = schedulers[1].plan(tier=tier)
            tiers.append(_scanned(plan))
            schedulers[1].complete(plan, _result(plan, {0: kernels[1].take(tiers[-1])}))
        assert not tiers[0] & tiers[1]
        assert tiers[0] | tiers[1] == whole
        if tick >= 30:
            assert tiers[0] == {2}  # the hot chunk, alone in the first tier
            n_split += bool(tiers[1])
    assert n_split > 0
    stats = [scheduler.statistics("s") for scheduler in schedulers]
    assert stats[0] == stats[1]


def test_a_plan_split_in_parts_scans_the_same_chunks_and_each_part_completes() -> None:
    clock = Clock()
    scheduler = _scheduler(clock)
    scheduler.add("a", 3, as_regions([(BASE, BASE + 6 * CHUNK)]), max_staleness_ms=0)
    scheduler.add("b", 4, as_regions([(BASE, BASE + 3 * CHUNK)]), max_staleness_ms=0)
    clock.advance(TICK_MS)
    plan = scheduler.plan()
    parts = scheduler.split(plan, 4 * 16)  # 4 chunks of 16 pages each
    assert [part.request_keys.tolist() for part in parts] == [["a"], ["a", "b"], ["b"]]
    assert np.concatenate([part.chunks for part in parts]).tolist() == plan.chunks.tolist()
    assert sum(part.requests.n_pages for part in parts) == plan.requests.n_pages
    # Each part completes on its own: a write its scan found heats its chunk ("a"'s chunk 5, in part 1).
    for index, part in enumerate(parts):
        found = [(BASE + 5 * CHUNK, BASE + 5 * CHUNK + 2 * PAGE)] if index == 1 else []
        scheduler.complete(part, _result(part, {0: found}))
    stats = scheduler.statistics("a")
    assert stats is not None and stats.n_hot_pages == 16
    assert scheduler.split(plan, 1 << 20) == [plan]  # fits in one part


def test_a_bound_of_one_tick_or_less_scans_everything_every_tick_in_one_request() -> None:
    clock = Clock()
    scheduler = _scheduler(clock)
    scheduler.add("a", 3, as_regions([(BASE, BASE + 4 * CHUNK)]), max_staleness_ms=0)
    scheduler.add("b", 4, as_regions([(BASE, BASE + 2 * CHUNK)]), max_staleness_ms=TICK_MS)
    for _ in range(5):
        clock.advance(TICK_MS)
        plan = scheduler.plan()
        assert plan.request_keys.tolist() == ["a", "b"]  # adjacent chunks coalesced: one request per session
        assert plan.requests.array["fd"].tolist() == [3, 4]
        assert plan.requests.array["end"].tolist() == [BASE + 4 * CHUNK, BASE + 2 * CHUNK]
        assert len(scheduler.plan(tier=Tier.REST)) == 0  # all of it is in the first tier
        scheduler.complete(plan, _result(plan, {}))


def test_overload_sheds_warm_then_hot_reports_lag_and_recovers() -> None:
    clock = Clock()
    scheduler = _scheduler(clock, calm_ticks=5)
    scheduler.add("s", 3, as_regions([(BASE, BASE + 4 * CHUNK)]), max_staleness_ms=1000)
    hot = [(BASE, BASE + 8 * PAGE)]
    kernel = FakeKernel()
    for _ in range(25):
        _tick(scheduler, clock, hot, kernel)
    assert 0 in _tick(scheduler, clock, hot, kernel)
    for _ in range(50):  # ticks started late (the machine busy with others) shed nothing...
        scheduler.note_tick(late_ns=2 * TICK_MS * MS, busy_ns=TICK_MS * MS // 10)
    assert scheduler.shed_level == 0 and scheduler.n_ticks_late == 50
    scheduler.note_tick(late_ns=0, busy_ns=TICK_MS * MS)  # ...one busy interval is noise...
    for _ in range(10):
        scheduler.note_tick(late_ns=0, busy_ns=0)
    assert scheduler.shed_level == 0
    n_ticks = 0
    while scheduler.shed_level < 3:  # ...the daemon's own work filling every interval is not
        scheduler.note_tick(late_ns=0, busy_ns=TICK_MS * MS)
        n_ticks += 1
    assert n_ticks <= 30  # hot chunks every 4th tick now
    scans = sum(0 in _tick(scheduler, clock, hot, kernel) for _ in range(20))
    assert 4 <= scans <= 6
    stats = scheduler.statistics("s")
    assert stats is not None and stats.shed_level == 3 and stats.n_ticks_late > 0 and stats.max_lag_ms > 0
    for _ in range(40):
        scheduler.note_tick(late_ns=0, busy_ns=0)
    assert scheduler.shed_level == 0
    # However loaded, the level stops where hot chunks reach the staleness bound: nobody starves.
    for _ in range(50):  # busy through periods of two intervals (late ticks)
        scheduler.note_tick(late_ns=TICK_MS * MS, busy_ns=2 * TICK_MS * MS, period_ns=2 * TICK_MS * MS)
    assert TICK_MS << (scheduler.shed_level - 1) >= 1000
    seen = set()
    for _ in range(21):
        seen |= _tick(scheduler, clock, hot, kernel)
    assert seen == {0, 1, 2, 3}


def test_changed_ranges_keep_the_heat_of_chunks_that_stay() -> None:
    clock = Clock()
    scheduler = _scheduler(clock)
    scheduler.add("s", 3, as_regions([(BASE, BASE + 2 * CHUNK)]), max_staleness_ms=1000)
    hot = [(BASE, BASE + 8 * PAGE)]
    kernel = FakeKernel()
    for _ in range(25):
        _tick(scheduler, clock, hot, kernel)
    scheduler.set_ranges("s", as_regions([(BASE, BASE + 2 * CHUNK), (BASE + 4 * CHUNK, BASE + 5 * CHUNK)]))
    scanned = _tick(scheduler, clock, hot, kernel)
    assert scanned == {0, 4}  # the hot chunk, and the new one (never scanned: due at once)
    scheduler.remove("s")
    assert len(scheduler.plan()) == 0


# -- exactness against the kernel


@pytest.fixture(scope="module")
def armed() -> Iterator[tuple[CoopTarget, PagemapScanner]]:
    target = CoopTarget(256)
    uffd = Userfaultfd.from_process(target.pid, target.uffd_fd)
    uffd.api()
    uffd.register(target.base, target.end - target.base)
    uffd.write_protect(target.base, target.end - target.base)
    scanner = PagemapScanner(target.pid)
    yield target, scanner
    scanner.close()
    uffd.close()
    target.kill()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rounds=st.lists(
        st.lists(st.tuples(st.integers(0, 255), st.integers(1, 6)), max_size=12),
        min_size=1,
        max_size=30,
    ),
    staleness_ticks=st.integers(0, 25),
)
def test_union_of_tick_deltas_is_exactly_the_writes(
    armed: tuple[CoopTarget, PagemapScanner], rounds: list[list[tuple[int, int]]], staleness_ticks: int
) -> None:
    """Random writes that make chunks hot, let them cool, or leave them cold: whatever the plans
    scanned (each tick in two tiers, as the daemon's), the union of what ticks found plus a final
    full harvest is exactly what was written, and a write is found by the ticks within the
    staleness bound."""
    target, scanner = armed
    batch = BatchScanner()
    full = BatchRequests([scanner.fileno()], [target.base], [target.end])
    batch.harvest(full)  # start clean
    clock = Clock()
    scheduler = HeatScheduler(
        TICK_MS, policy=HeatPolicy(min_chunk_bytes=CHUNK, half_life_ms=100, warm_every_ticks=3), clock=clock
    )
    bound_ms = staleness_ticks * TICK_MS
    scheduler.add("s", scanner.fileno(), as_regions([(target.base, target.end)]), max_staleness_ms=bound_ms)
    written: set[int] = set()
    reported: set[int] = set()
    pending: dict[int, int] = {}  # page -> tick it was written at
    for tick, writes in enumerate(rounds):
        for page, n in writes:
            target.write(page, min(n, 256 - page))
            for p in range(page, min(page + n, 256)):
                written.add(p)
                pending.setdefault(p, tick)
        clock.advance(TICK_MS)
        found = set()
        for tier in (Tier.EVERY_TICK, Tier.REST):
            plan = scheduler.plan(tier=tier)
            result = batch.harvest(plan.requests)
            assert not result.errors.any()
            scheduler.complete(plan, result)
            found |= target.pages(result.regions)
        assert not found & reported - written  # nothing reported that was not written
        reported |= found
        for p in found:
            pending.pop(p, None)
        # The bound: a write waits at most max(bound, one tick) for a tick to report it.
        overdue = [p for p, t in pending.items() if (tick - t) * TICK_MS > max(bound_ms, TICK_MS)]
        assert not overdue, f"pages {overdue} waited past {bound_ms} ms"
    final = batch.harvest(full)  # flush(): a full scan, as every barrier does
    reported |= target.pages(final.regions)
    assert reported == written
