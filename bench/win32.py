"""Benchmark 7: Win32 GetWriteWatch latency for Wine's own microbenchmark shapes.

Shapes: 1,080 pages written by 6 threads, and 8,192 pages by 8 threads; then one
``GetWriteWatch(WRITE_WATCH_FLAG_RESET)`` over the region lists (and resets) them all.
Each round, interleaved:

- C (bench/fixtures/writecost.c ``watch``, native threads): the mprotect + SIGSEGV
  emulation (Wine's fallback: a per-page written byte set by the handler, listed, then the
  range mprotected read-only again), and the bare-kernel floor (one PAGEMAP_SCAN with
  WP_MATCHING and max_pages, expanded to page addresses, in C);
- ``WriteWatch.get_write_watch`` in-process, the writers being Python threads calling
  ``ctypes.memset`` on their share (which releases the GIL);
- ``View.get_write_watch`` over gRPC, of a target whose native threads wrote (``p`` command).

Only the GetWriteWatch call is timed; every variant checks it got all the pages.
"""

from __future__ import annotations

import ctypes
import subprocess
import threading
import time
from typing import Any

from common import PAGE_SIZE, AnonMemory, Daemon, Section, Stats, Target, build

from writewatchd.tracking import WriteWatch

SHAPES = [(1080, 6), (8192, 8)]


def _c_round(n_pages: int, n_threads: int) -> dict[str, float]:
    """One round of each C mode: GetWriteWatch microseconds by mode."""
    out = subprocess.run(
        [str(build("writecost")), "watch", str(n_pages), str(n_threads), "1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, float] = {}
    for line in out.splitlines():
        _, mode, get_ns, _write_ns, n_addresses = line.split()
        if mode != "untracked":
            if int(n_addresses) != n_pages:
                raise RuntimeError(f"{mode}: {n_addresses} of {n_pages} pages listed")
            result[mode] = int(get_ns) / 1e3
    return result


def _threaded_memset(memory: AnonMemory, n_threads: int, value: int) -> None:
    n_pages = memory.n_pages

    def write_share(t: int) -> None:
        first = n_pages * t // n_threads
        last = n_pages * (t + 1) // n_threads
        ctypes.memset(memory.addr + first * PAGE_SIZE, value, (last - first) * PAGE_SIZE)

    threads = [threading.Thread(target=write_share, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run(quick: bool) -> Section:
    """Benchmark 7."""
    rounds = 3 if quick else 15
    section = Section(
        "7. Win32 shape (GetWriteWatch)",
        "GetWriteWatch latency of writewatch in-process and over gRPC for Wine's shapes, against the "
        "mprotect emulation doing the same (no numeric goal; lower is better).",
        [
            "shape",
            "mprotect emulation us (C)",
            "bare PAGEMAP_SCAN us (C)",
            "WriteWatch in-process us",
            "View over gRPC us",
            "of it: Harvest RPC us",
            "mprotect / in-process",
            "mprotect / gRPC",
        ],
    )
    with Daemon() as daemon:
        client = daemon.client()
        try:
            for n_pages, n_threads in SHAPES:
                samples: dict[str, list[float]] = {
                    "mprotect": [],
                    "uffd": [],
                    "in-process": [],
                    "grpc": [],
                    "harvest-rpc": [],
                }
                memory = AnonMemory(n_pages * PAGE_SIZE)
                memory.populate("write")
                with WriteWatch() as watch, Target(n_pages, "write") as target:
                    watch.watch(memory.addr, memory.length_bytes, no_huge_pages=True)
                    session = client.attach(
                        target.pid,
                        ranges=[(target.base, target.end)],
                        uffd_fd=target.uffd_fd,
                        tick_interval_ms=3_600_000,
                    )
                    view = session.view("bench")
                    view.get_write_watch(target.base, n_pages * PAGE_SIZE, max_count=n_pages, reset=True)

                    def in_process(
                        value: int, watch: WriteWatch = watch, memory: AnonMemory = memory, n_threads: int = n_threads
                    ) -> float:
                        _threaded_memset(memory, n_threads, value)
                        started_ns = time.perf_counter_ns()
                        result = watch.get_write_watch(
                            memory.addr, memory.length_bytes, max_count=memory.n_pages, reset=True
                        )
                        elapsed_us = (time.perf_counter_ns() - started_ns) / 1e3
                        if len(result.addresses) != memory.n_pages:
                            raise RuntimeError(f"in-process: {len(result.addresses)} of {memory.n_pages} pages")
                        return elapsed_us

                    def over_grpc(
                        target: Target = target, n_pages: int = n_pages, n_threads: int = n_threads, view: object = view
                    ) -> float:
                        target.command(f"p {n_threads} {n_pages}")
                        started_ns = time.perf_counter_ns()
                        result = view.get_write_watch(  # type: ignore[attr-defined]
                            target.base, n_pages * PAGE_SIZE, max_count=n_pages, reset=True
                        )
                        elapsed_us = (time.perf_counter_ns() - started_ns) / 1e3
                        if len(result.addresses) != n_pages:
                            raise RuntimeError(f"gRPC: {len(result.addresses)} of {n_pages} pages")
                        return elapsed_us

                    def harvest_rpc(
                        target: Target = target,
                        n_pages: int = n_pages,
                        n_threads: int = n_threads,
                        session: Any = session,
                    ) -> float:
                        """The same writes, then only the Harvest RPC: what GetWriteWatch costs before the view."""
                        target.command(f"p {n_threads} {n_pages}")
                        started_ns = time.perf_counter_ns()
                        session.harvest()
                        return (time.perf_counter_ns() - started_ns) / 1e3

                    in_process(1)  # warm-up
                    over_grpc()
                    for r in range(rounds):
                        steps = ["c", "in-process", "grpc", "harvest-rpc"]
                        for step in steps[r % 4 :] + steps[: r % 4]:
                            if step == "c":
                                for mode, us in _c_round(n_pages, n_threads).items():
                                    samples[mode].append(us)
                            elif step == "in-process":
                                samples["in-process"].append(in_process(r % 250 + 2))
                            elif step == "grpc":
                                samples["grpc"].append(over_grpc())
                            else:
                                samples["harvest-rpc"].append(harvest_rpc())
                    session.close()
                memory.close()
                stats = {k: Stats.of(v) for k, v in samples.items()}
                section.add(
                    f"{n_pages} pages, {n_threads} threads",
                    stats["mprotect"].fmt(1),
                    stats["uffd"].fmt(1),
                    stats["in-process"].fmt(1),
                    stats["grpc"].fmt(1),
                    stats["harvest-rpc"].fmt(1),
                    Stats.of([m / i for m, i in zip(samples["mprotect"], samples["in-process"], strict=True)]).fmt(2),
                    Stats.of([m / g for m, g in zip(samples["mprotect"], samples["grpc"], strict=True)]).fmt(2),
                )
        finally:
            client.close()
    section.evidence.append(
        f"{rounds} interleaved rounds per shape; ratios are per round (> 1: writewatch is faster). The gRPC "
        "figure includes the daemon's harvest of the target before answering from the view."
    )
    return section
