"""Benchmark 5: 200 sessions x 4 subscribers, idle and busy: daemon CPU and RSS.

200 small cooperative targets (64 pages each, their own userfaultfd) are attached at 50 ms
ticks; 4 subscriber processes each open one stream per session (800 streams, asyncio).
CPU is utime+stime of the daemon from /proc/PID/stat over a window; RSS is VmRSS after it.
The same window is measured first on the same daemon with no session (its floor), and the
harvest rate is checked from the sessions' own counters.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from multiprocessing.synchronize import Event

from common import MIB, Daemon, Section, Stats, cpu_seconds, rss_bytes, targets

from writewatch import AsyncClient

_TICK_MS = 50
_N_SUBSCRIBER_PROCESSES = 4
_TARGET_PAGES = 64


def _subscriber_process(
    address: str,
    session_ids: list[str],
    ready: mp.Queue,
    stop: Event,  # type: ignore[type-arg]
    results: mp.Queue,
) -> None:  # type: ignore[type-arg]
    """One stream per session, counting deltas, until ``stop``."""
    import uvloop

    async def main() -> int:
        n_deltas = 0
        async with AsyncClient(address, timeout_s=60) as client:
            sessions = [await client.session(session_id) for session_id in session_ids]

            async def consume(index: int) -> None:
                nonlocal n_deltas
                snapshot = sessions[index].snapshot
                async for _ in sessions[index].subscribe((snapshot.epoch, snapshot.last_seq), reconnect=False):
                    n_deltas += 1

            tasks = [asyncio.create_task(consume(i)) for i in range(len(sessions))]
            await asyncio.sleep(0.5)  # streams open
            ready.put(1)
            while not stop.is_set():
                await asyncio.sleep(0.05)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return n_deltas

    results.put(uvloop.run(main()))


def _window(pid: int, seconds: float) -> float:
    """CPU % of one core used by ``pid`` over the next ``seconds``."""
    before_s, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before_s) / (time.monotonic() - started) * 100


def run(quick: bool) -> Section:
    """Benchmark 5."""
    n_sessions, window_s, windows = (20, 1.0, 1) if quick else (200, 10.0, 3)
    ctx = mp.get_context("spawn")
    section = Section(
        "5. Scale",
        f"{n_sessions} sessions x 4 subscribers at {_TICK_MS} ms ticks: idle daemon CPU <= 2 % of a core; "
        "RSS <= 200 MiB.",
        ["state", "daemon CPU % of one core", "RSS MiB", "harvests/s", "deltas/s received"],
    )
    with Daemon() as daemon, targets(n_sessions, _TARGET_PAGES) as procs:
        empty_cpu = [_window(daemon.pid, window_s) for _ in range(windows)]
        section.add("no sessions (floor)", Stats.of(empty_cpu).fmt(2), f"{rss_bytes(daemon.pid) / MIB:.0f}", "-", "-")
        client = daemon.client()
        sessions = [
            client.attach(t.pid, ranges=[(t.base, t.end)], uffd_fd=t.uffd_fd, tick_interval_ms=_TICK_MS) for t in procs
        ]
        ready, results = ctx.Queue(), ctx.Queue()
        stop = ctx.Event()
        ids = [s.id for s in sessions]
        subscribers = [
            ctx.Process(target=_subscriber_process, args=(daemon.address, ids, ready, stop, results))
            for _ in range(_N_SUBSCRIBER_PROCESSES)
        ]
        for process in subscribers:
            process.start()
        try:
            for _ in subscribers:
                ready.get(timeout=120)
            n_streams = sum(s.info().statistics.n_subscribers for s in sessions)
            if n_streams != n_sessions * _N_SUBSCRIBER_PROCESSES:
                raise RuntimeError(f"{n_streams} streams open, expected {n_sessions * _N_SUBSCRIBER_PROCESSES}")
            rss: dict[str, float] = {}
            cpu: dict[str, list[float]] = {"idle": [], "busy": []}
            rates: dict[str, list[float]] = {"idle": [], "busy": []}
            for state in ("idle", "busy"):
                for _ in range(windows):
                    harvests_before = sum(s.info().statistics.n_harvests for s in sessions)
                    if state == "busy":
                        # Each target writes 4 random pages every 10 ms through the window.
                        for t in procs:
                            t.send(f"busy {int(window_s * 1000)} 10 4")
                    started = time.monotonic()
                    cpu[state].append(_window(daemon.pid, window_s))
                    if state == "busy":
                        for t in procs:
                            t.answer()
                    elapsed_s = time.monotonic() - started
                    harvests = sum(s.info().statistics.n_harvests for s in sessions) - harvests_before
                    rates[state].append(harvests / elapsed_s)
                rss[state] = rss_bytes(daemon.pid) / MIB
        finally:
            stop.set()
            n_deltas = [results.get(timeout=60) for _ in subscribers]
            for process in subscribers:
                process.join(30)
                if process.is_alive():
                    process.kill()
            client.close()
    total_s = 2 * windows * window_s
    for state in ("idle", "busy"):
        section.add(
            f"{state}, {n_sessions} sessions, {len(ids) * _N_SUBSCRIBER_PROCESSES} streams",
            Stats.of(cpu[state]).fmt(2),
            f"{rss[state]:.0f}",
            Stats.of(rates[state]).fmt(0),
            f"{sum(n_deltas) / total_s:.0f} (both states)" if state == "busy" else "",
        )
    idle = Stats.of(cpu["idle"]).median
    section.verdict(f"idle CPU <= 2 % of a core: {idle:.2f} %", idle <= 2)
    peak_rss = max(rss.values())
    section.verdict(f"RSS <= 200 MiB: {peak_rss:.0f} MiB", peak_rss <= 200)
    section.evidence.append(
        f"Idle means {n_sessions} x {1000 // _TICK_MS} = {n_sessions * 1000 // _TICK_MS} harvests/s that find "
        f"nothing: the idle CPU divided by the harvest rate is the fixed cost of one tick of one session, "
        f"{idle / 100 / max(Stats.of(rates['idle']).median, 1) * 1e6:.1f} us."
    )
    return section
