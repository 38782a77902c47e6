"""Benchmark 10: a 64 GiB target, three hot ranges: heat scheduling against naive full scans.

The target (bench/fixtures/hotcold.c) maps 64 GiB of private anonymous memory and reads
every page (each maps the shared zero page: ~128 MiB of page tables, no RAM). Three hot
ranges hold 1 % of its pages. Through each measured window it stores into the hot ranges
at a steady rate (``_HOT_PER_TICK`` stores per 50 ms tick, spread evenly) and into
``_COLD_PER_S`` pseudo-random pages anywhere per second, stamping every store with
CLOCK_REALTIME right after it. A subscriber thread in this process notes the arrival of each
delta. A write's latency is the arrival of the first delta that holds its page and was
harvested after the write.

Two modes in alternating rounds on the same target and daemon, each a fresh session: heat
(``max_staleness_ms`` 1000, the default) and naive (``max_staleness_ms`` 0: every range every
tick, the baseline). Daemon CPU is utime+stime over the window. After each window the
benchmark waits out the staleness bound before its ``flush()``, and counts the writes that
only the flush delivered (none, when the ticks kept the bound).

The kernel's floor, in rounds of their own (a session the daemon does not tick holds the
registration): bench/fixtures/barescan.c makes exactly the scans an oracle heat scheduler
needs (the three hot ranges every tick, a twentieth of the memory per tick so each page is
scanned once per second), or naive full scans, and nothing else; its own CPU is the figure.
Where the scanner runs matters: each 2 MiB page table whose pages a scan re-protects costs a
TLB shootdown, an IPI the scanner waits for, when the target runs on another CPU at that
moment. So it runs pinned twice, on the writer's CPU (the writer pinned too) and on another.

Why not 1 % of all pages rewritten per tick: 167,772 first writes per 50 ms tick would take
~150 ms of the writer's CPU in write-protect faults alone (~0.9 us each, section 2) on these
2 vCPUs, and their re-protection ~6 ms of kernel walk per tick in any tracker. The hot set is
1 % of the pages; the writer rewrites as many of them per tick as it can sustain here.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from common import GIB, PAGE_SIZE, Daemon, Section, Stats, Target, build, cpu_seconds

from writewatch import Client, Delta, Session

_TICK_MS = 50
_HOT_PER_TICK = 2000
_COLD_PER_S = 20
_MODES = {"heat": 1000, "naive": 0}
#: The bare-ioctl baselines: (max_staleness_ms, scan the hot ranges every tick, scanner on the writer's CPU).
_BARE = {
    "bare ioctls, heat's scans, scanner on the writer's CPU": (1000, True, True),
    "bare ioctls, heat's scans, scanner on another CPU": (1000, True, False),
    "bare ioctls, naive full scans, scanner on another CPU": (_TICK_MS, False, False),
}
#: The longest tick and bound: a session that holds the registration for a bare round, unticked.
_UNTICKED_MS = 3_600_000


class HotCold(Target):
    """bench/fixtures/hotcold.c: the target's header and commands, over far more memory."""

    exit_timeout_s = 30.0  # unmapping 64 GiB of page tables takes a while

    def __init__(self, n_pages: int) -> None:
        super().__init__(n_pages, argv=[str(build("hotcold")), str(n_pages)])


class Arrivals:
    """Every delta of a subscription with its arrival time (CLOCK_REALTIME ns), on a thread."""

    def __init__(self, session: Session) -> None:
        self.deltas: list[tuple[int, Delta]] = []
        snapshot = session.info()
        self._stream = session.subscribe((snapshot.epoch, snapshot.last_seq), reconnect=False)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for delta in self._stream:
            self.deltas.append((time.time_ns(), delta))


def _latencies_ms(
    arrivals: list[tuple[int, Delta]], base: int, pages: npt.NDArray[np.int64], stamps: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    """Per write: ms from its stamp to the first delta harvested after it with its page (NaN: none)."""
    entry_pages: list[npt.NDArray[np.int64]] = []
    entry_harvested: list[npt.NDArray[np.int64]] = []
    entry_arrived: list[npt.NDArray[np.int64]] = []
    for arrived, delta in arrivals:
        if delta.resync or len(delta.regions) == 0:
            continue
        starts = (delta.regions[:, 0].astype(np.int64) - base) // PAGE_SIZE
        counts = (delta.regions[:, 1].astype(np.int64) - delta.regions[:, 0].astype(np.int64)) // PAGE_SIZE
        offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
        entry_pages.append(np.arange(int(counts.sum()), dtype=np.int64) + offsets)
        entry_harvested.append(np.full(int(counts.sum()), delta.harvested_at_unix_ns, np.int64))
        entry_arrived.append(np.full(int(counts.sum()), arrived, np.int64))
    latencies = np.full(len(pages), np.nan)
    if not entry_pages:
        return latencies
    e_pages, e_harvested, e_arrived = (np.concatenate(x) for x in (entry_pages, entry_harvested, entry_arrived))
    t0 = min(int(e_harvested.min()), int(stamps.min())) - 1
    # One sortable key per (page, time): page in the high bits, microseconds since t0 below.
    e_key = (e_pages << 38) | ((e_harvested - t0) // 1000)
    order = np.argsort(e_key, kind="stable")
    e_key, e_pages_sorted, e_arrived = e_key[order], e_pages[order], e_arrived[order]
    w_key = (pages << 38) | ((stamps - t0) // 1000)
    index = np.searchsorted(e_key, w_key, side="left")
    found = index < len(e_key)
    found[found] &= e_pages_sorted[index[found]] == pages[found]
    latencies[found] = (e_arrived[index[found]] - stamps[found]) / 1e6
    return latencies


def _one_round(
    client: Client,
    target: HotCold,
    mode: str,
    hot_starts: list[int],
    hot_pages: int,
    window_s: float,
    daemon_pid: int,
    settle_s: float,
) -> dict[str, float]:
    session = client.attach(
        target.pid,
        ranges=[(target.base, target.end)],
        uffd_fd=target.uffd_fd,
        tick_interval_ms=_TICK_MS,
        max_staleness_ms=_MODES[mode],
    )
    arrivals = Arrivals(session)
    try:
        time.sleep(settle_s)  # past the first scans of everything (the attach's RESYNC, then one bound)
        records = Path(f"/tmp/ww-bench-hotcold-{target.pid}.bin")
        target.send(
            f"hot {int((settle_s + window_s) * 1000)} {_TICK_MS} {_HOT_PER_TICK} {' '.join(map(str, hot_starts))} "
            f"{hot_pages} {_COLD_PER_S} {time.monotonic_ns() % 1000} {records}"
        )
        # The hot ranges start cold: their first writes wait for a scan at the bound, which finds
        # them hot. The steady state (CPU, hot latency) is measured after that.
        time.sleep(settle_s)
        steady_from_ns = time.time_ns()
        cpu_before, started = cpu_seconds(daemon_pid), time.monotonic()
        time.sleep(window_s)
        cpu_percent = (cpu_seconds(daemon_pid) - cpu_before) / (time.monotonic() - started) * 100
        target.answer()
        time.sleep(_MODES["heat"] / 1000 + settle_s / 2)  # let the ticks deliver every write within the bound
        n_before_flush = len(arrivals.deltas)
        epoch, seq = session.flush()
        deadline = time.monotonic() + 60
        while not arrivals.deltas or (arrivals.deltas[-1][1].epoch, arrivals.deltas[-1][1].seq) < (epoch, seq):
            if time.monotonic() > deadline:
                raise RuntimeError("the flush's delta never arrived")
            time.sleep(0.01)
        data = np.fromfile(records, dtype=np.uint64).reshape(-1, 3).astype(np.int64)
        records.unlink()
        pages, stamps, hot = data[:, 0], data[:, 1], data[:, 2].astype(bool)
        steady_hot = hot & (stamps >= steady_from_ns)
        ticks_only = _latencies_ms(arrivals.deltas[:n_before_flush], target.base, pages, stamps)
        with_flush = _latencies_ms(arrivals.deltas, target.base, pages, stamps)
        if np.isnan(with_flush).any():
            raise RuntimeError(f"{int(np.isnan(with_flush).sum())} writes never arrived, even after flush()")
        stats = session.info().statistics
    finally:
        session.close()
        arrivals.thread.join(30)
    return {
        "cpu": cpu_percent,
        "hot_p50": float(np.nanpercentile(ticks_only[steady_hot], 50)),
        "hot_p99": float(np.nanpercentile(ticks_only[steady_hot], 99)),
        "cold_max": float(np.nanmax(ticks_only[~hot])) if (~hot).any() else float("nan"),
        "all_max": float(np.nanmax(ticks_only)),
        "by_flush": float(np.isnan(ticks_only).sum()),
        "n_hot": float(steady_hot.sum()),
        "n_cold": float((~hot).sum()),
        "lag": stats.max_scan_lag_ms,
        "late": 100 * stats.n_ticks_late / max(stats.n_ticks_due, 1),
    }


def _bare_round(
    client: Client,
    target: HotCold,
    name: str,
    hot_starts: list[int],
    hot_pages: int,
    window_s: float,
    settle_s: float,
) -> float:
    """CPU % of one core of bench/fixtures/barescan.c making baseline ``name``'s scans through a window."""
    staleness_ms, hot_every_tick, same_cpu = _BARE[name]
    cpus = sorted(os.sched_getaffinity(0))
    writer_cpu, scanner_cpu = cpus[0], cpus[0] if same_cpu or len(cpus) == 1 else cpus[1]
    session = client.attach(
        target.pid,
        ranges=[(target.base, target.end)],
        uffd_fd=target.uffd_fd,
        tick_interval_ms=_UNTICKED_MS,
        max_staleness_ms=_UNTICKED_MS,
    )
    records = Path(f"/tmp/ww-bench-hotcold-{target.pid}.bin")
    os.sched_setaffinity(target.pid, {writer_cpu})
    try:
        target.send(
            f"hot {int((settle_s + window_s) * 1000)} {_TICK_MS} {_HOT_PER_TICK} "
            f"{' '.join(map(str, hot_starts))} {hot_pages} {_COLD_PER_S} {time.monotonic_ns() % 1000} {records}"
        )
        time.sleep(settle_s)
        hot = [
            str(target.base + page * PAGE_SIZE)
            for start in (hot_starts if hot_every_tick else [])
            for page in (start, start + hot_pages)
        ]
        argv = [str(build("barescan")), str(target.pid), str(_TICK_MS), str(staleness_ms), str(int(window_s * 1000))]
        out = subprocess.run(
            [*argv, str(target.base), str(target.end), *hot],
            capture_output=True,
            text=True,
            check=True,
            timeout=window_s + 60,
            preexec_fn=lambda: os.sched_setaffinity(0, {scanner_cpu}),
        ).stdout.split()
        if out[0] != "ok":
            raise RuntimeError(f"barescan: {out}")
        target.answer()
    finally:
        os.sched_setaffinity(target.pid, cpus)
        session.close()
        records.unlink(missing_ok=True)
    return int(out[3]) / (window_s * 1e9) * 100


def _free_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / (1 << 20)
    return 0.0


def run(quick: bool) -> Section:
    """Benchmark 10."""
    size_gib, window_s, rounds, settle_s = (1, 1.0, 1, 1.2) if quick else (64, 10.0, 2, 2.5)
    # Page tables of read-faulted zero pages (~2 MiB per GiB) plus the hot set once written.
    needed_gib = size_gib * (2 / 1024 + 0.01) + 1
    if _free_gib() < needed_gib:
        size_gib = max(1, int((_free_gib() - 1) / (2 / 1024 + 0.01)))
    n_pages = size_gib * GIB // PAGE_SIZE
    hot_pages = n_pages // 300  # three ranges: 1 % of the pages
    hot_starts = [n_pages // 8, n_pages // 2, n_pages * 7 // 8]
    section = Section(
        "10. Heat scheduling: a 64 GiB target with three hot ranges",
        "hot writes reach a subscriber within tick + 2 ms (p99); every write within max_staleness_ms; daemon <= 10 % "
        "of a core; against naive full scans in the same run.",
        [
            "mode",
            "daemon CPU % of one core",
            "hot write -> subscriber p50 ms",
            "p99 ms",
            "cold writes: max ms",
            "all writes: max ms",
            "writes left for flush()",
            "steady hot / all cold writes per round",
            "ticks late %",
        ],
    )
    populate_started = time.monotonic()
    target = HotCold(n_pages)
    populate_s = time.monotonic() - populate_started
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in _MODES}
    bare: dict[str, list[float]] = {name: [] for name in _BARE}
    try:
        with Daemon() as daemon:
            client = daemon.client()
            assert isinstance(client, Client)
            try:
                for r in range(rounds):
                    for mode in sorted(_MODES, reverse=r % 2 == 1):
                        results[mode].append(
                            _one_round(client, target, mode, hot_starts, hot_pages, window_s, daemon.pid, settle_s)
                        )
                    for name in sorted(_BARE, reverse=r % 2 == 1):
                        bare[name].append(_bare_round(client, target, name, hot_starts, hot_pages, window_s, 1.0))
            finally:
                client.close()
    finally:
        target.close()
    for mode, per_round in results.items():

        def stat(key: str, per_round: list[dict[str, float]] = per_round) -> Stats:
            return Stats.of([x[key] for x in per_round])

        section.add(
            f"{mode} (max_staleness_ms {_MODES[mode]})",
            stat("cpu").fmt(2),
            stat("hot_p50").fmt(2),
            stat("hot_p99").fmt(2),
            stat("cold_max").fmt(0),
            stat("all_max").fmt(0),
            f"{int(max(x['by_flush'] for x in per_round))}",
            f"{int(stat('n_hot').median)} / {int(stat('n_cold').median)}",
            stat("late").fmt(1),
        )
    for name, percents in bare.items():
        section.add(name, Stats.of(percents).fmt(2), *["-"] * 7)
    heat = results["heat"]
    naive = results["naive"]
    hot_p99 = Stats.of([x["hot_p99"] for x in heat]).median
    worst_ms = max(x["all_max"] for x in heat)
    by_flush = max(x["by_flush"] for x in heat)
    cpu = Stats.of([x["cpu"] for x in heat]).median
    naive_cpu = Stats.of([x["cpu"] for x in naive]).median
    section.verdict(f"heat: hot p99 {hot_p99:.2f} ms <= tick + 2 = {_TICK_MS + 2} ms", hot_p99 <= _TICK_MS + 2)
    section.verdict(
        f"heat: every write within max_staleness_ms 1000: worst {worst_ms:.0f} ms, {by_flush:.0f} left for flush()",
        worst_ms <= 1000 and by_flush == 0,
    )
    floor_same, floor_other, _ = (Stats.of(bare[name]).median for name in _BARE)
    section.verdict(
        f"heat: daemon {cpu:.2f} % of a core <= 10 % (naive full scans: {naive_cpu:.2f} %; the bare ioctls of heat's "
        f"scans: {floor_same:.2f} % on the writer's CPU, {floor_other:.2f} % on another)",
        cpu <= 10,
    )
    section.evidence.append(
        f"Target: {size_gib} GiB ({n_pages} pages) populated by reads in {populate_s:.0f} s, tracked as one range; "
        f"hot ranges: 3 x {hot_pages} pages (1 % of the pages) at pages {hot_starts}; per {_TICK_MS} ms tick "
        f"{_HOT_PER_TICK} stores into them, and {_COLD_PER_S} stores per second anywhere; {window_s:g} s windows, "
        f"{rounds} alternating rounds per mode, same target and daemon, a fresh session per round. The writer starts "
        f"{settle_s:g} s before each window: the hot ranges start cold (a fresh session), and their first writes wait "
        "for the scan at the bound that finds them hot; CPU and the hot latency are those of the steady window after "
        "that, the maxima are over every write. The bare-ioctl rows are bench/fixtures/barescan.c alone (its own CPU), "
        f"{rounds} rounds each between the daemon's, the writer pinned to one CPU: the hot ranges every tick and a "
        "twentieth of the memory per tick (every page once a second), or everything every tick."
    )
    section.evidence.append(
        "Where the time goes (profiled by hand at 64 GiB, 2026-11-30: `perf record -g` of the daemon, py-spy, and "
        "barescan timing each call): about 70 % of the daemon's CPU is inside PAGEMAP_SCAN, two thirds of that in "
        "TLB shootdowns (`flush_tlb_mm_range` -> `smp_call_function_many_cond`, `x2apic_send_IPI`): the kernel "
        "flushes once per 2 MiB page table whose pages a scan re-protects, and the 2,000 hot stores per tick land in "
        "~330 of them, so each tick's hot scan sends ~330 IPIs to the writer's CPU and waits ~20 us for each on this "
        "VM (the hot scan takes 6-8 ms; 0.3 ms when the scanner shares the writer's CPU, where the flush is local). "
        "That is the bare-ioctl row on another CPU, above the 10 % goal by itself; the daemon adds ~6-8 % of a core "
        "(Python per tick and per delta, thread hand-offs, gRPC). The hot p99 is the tick (a write just after its "
        "page's scan waits ~50 ms) plus the time from its page's scan to the subscriber: the rest of the hot scan "
        "(IPI-bound; scanned and published in up to 4 parts to shorten it) plus ~1 ms of delivery. The cold sweep "
        "runs half a tick later and no longer adds to it."
    )
    if size_gib < 64 and not quick:
        section.evidence.append(f"Only {size_gib} GiB fit in the free RAM of this machine (page tables), not 64.")
    return section
