"""Benchmark 4: from a write in the target to its delta at a subscriber, at 1 ms and 50 ms ticks.

The target (bench/fixtures/target.c, command ``t``) stores into pages 0, 1, 2, ... one at a
time with random pauses, and stamps each store with CLOCK_REALTIME right after it. A
subscriber thread notes ``time.time_ns()`` when each delta arrives; a page's latency is the
arrival of the first delta holding it minus its stamp. Each delta's ``harvested_at_unix_ns``
splits that into write -> harvest (waiting for the tick, then the scan) and harvest ->
arrival (encode, fan-out, gRPC, client decode).
"""

from __future__ import annotations

import threading
import time

import numpy as np
from common import PAGE_SIZE, Daemon, Section, Stats, Target

from writewatch import Client, Session


def _one_round(
    client: Client, target: Target, tick_ms: int, n_writes: int, max_gap_us: int, seed: int
) -> dict[str, float]:
    """p50/p99 (ms) of write->arrival, write->harvest and harvest->arrival for one session."""
    # Every range every tick: this is the pipeline's latency; heat scheduling's (hot ranges
    # every tick, cold ones at the bound) is measured by bench/heat.py.
    session = client.attach(
        target.pid,
        ranges=[(target.base, target.end)],
        uffd_fd=target.uffd_fd,
        tick_interval_ms=tick_ms,
        max_staleness_ms=0,
    )
    snapshot = session.info()
    arrivals: list[tuple[int, int, np.ndarray]] = []
    subscribed = threading.Event()

    def subscriber(session: Session = session) -> None:
        stream = session.subscribe((snapshot.epoch, snapshot.last_seq), reconnect=False)
        subscribed.set()
        for delta in stream:
            arrivals.append((time.time_ns(), delta.harvested_at_unix_ns, delta.regions))

    thread = threading.Thread(target=subscriber)
    thread.start()
    try:
        subscribed.wait(10)
        time.sleep(0.05)  # let the stream open before the first write
        stamps = np.array([int(s) for s in target.command(f"t {n_writes} {max_gap_us} {seed}")], dtype=np.int64)
        time.sleep(tick_ms / 1000 * 3 + 0.05)  # the last write's tick, with margin
    finally:
        session.close()
        thread.join(10)
    arrival_ns = np.full(n_writes, -1, dtype=np.int64)
    harvest_ns = np.full(n_writes, -1, dtype=np.int64)
    for arrived_ns, harvested_ns, regions in arrivals:
        for start, end in regions.tolist():
            first = max(0, (start - target.base) // PAGE_SIZE)
            last = min(n_writes, (end - target.base) // PAGE_SIZE)
            if first >= last:
                continue
            unseen = arrival_ns[first:last] < 0
            arrival_ns[first:last][unseen] = arrived_ns
            harvest_ns[first:last][unseen] = harvested_ns
    if np.any(arrival_ns < 0):
        raise RuntimeError(f"{int(np.sum(arrival_ns < 0))} of {n_writes} writes never arrived (tick {tick_ms} ms)")
    total_ms = (arrival_ns - stamps) / 1e6
    to_harvest_ms = (harvest_ns - stamps) / 1e6
    to_arrival_ms = (arrival_ns - harvest_ns) / 1e6
    return {
        "p50": float(np.percentile(total_ms, 50)),
        "p99": float(np.percentile(total_ms, 99)),
        "harvest_p99": float(np.percentile(to_harvest_ms, 99)),
        "deliver_p50": float(np.percentile(to_arrival_ms, 50)),
        "deliver_p99": float(np.percentile(to_arrival_ms, 99)),
    }


def run(quick: bool) -> Section:
    """Benchmark 4."""
    # Writes spaced 0..2 ticks apart at 1 ms; 0..20 ms apart at 50 ms (several writes per tick).
    plans = {1: (2000, 2000), 50: (300, 20_000)}
    rounds = 3
    if quick:
        plans = {1: (100, 2000), 50: (20, 20_000)}
        rounds = 1
    section = Section(
        "4. Latency",
        "a write in the target reaches a subscriber with p99 <= tick + 2 ms.",
        [
            "tick",
            "writes/round",
            "p50 ms",
            "p99 ms",
            "write->harvest p99 ms",
            "harvest->arrival p50 ms",
            "harvest->arrival p99 ms",
        ],
    )
    results: dict[int, list[dict[str, float]]] = {tick: [] for tick in plans}
    with Daemon() as daemon, Target(max(n for n, _ in plans.values())) as target:
        client = daemon.client()
        try:
            for r in range(rounds):
                for tick in sorted(plans, reverse=r % 2 == 1):
                    n_writes, max_gap_us = plans[tick]
                    results[tick].append(_one_round(client, target, tick, n_writes, max_gap_us, seed=r))
        finally:
            client.close()
    for tick, per_round in results.items():

        def stat(key: str, per_round: list[dict[str, float]] = per_round) -> Stats:
            return Stats.of([x[key] for x in per_round])

        section.add(
            f"{tick} ms",
            plans[tick][0],
            stat("p50").fmt(2),
            stat("p99").fmt(2),
            stat("harvest_p99").fmt(2),
            stat("deliver_p50").fmt(2),
            stat("deliver_p99").fmt(2),
        )
        p99 = stat("p99").median
        section.verdict(f"tick {tick} ms: p99 {p99:.2f} ms <= {tick + 2} ms", p99 <= tick + 2)
    section.evidence.append(
        f"{rounds} rounds per tick, alternating; figures are medians (min-max) over rounds of each round's "
        "percentile. One session per round, one subscriber thread in the benchmark process (Unix socket)."
    )
    return section
