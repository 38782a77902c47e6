"""Benchmark 9: following exec and fork (docs/process-trees.md).

A. What a followed fork costs the target's ``fork()`` (bench/fixtures/proctree.c, timed inside
   the C program, 64 MiB of touched memory): untracked, tracked by a WP_ASYNC userfaultfd with
   no events (what writewatch does; the process-events connector adds nothing to the fork),
   and with ``UFFD_FEATURE_EVENT_FORK`` plus a monitor thread reading every fork event. For
   EVENT_FORK also the time from ``fork()`` to the monitor holding the child's uffd.
B. With the connector: from the kernel's fork/exec timestamp (CLOCK_MONOTONIC, same clock as
   ours) to the event read here, and to tracking armed in the new program or child
   (injected ``userfaultfd`` + ``Tracker(auto=True)``: every private writable mapping
   registered and write-protected), as the daemon does it.

    .venv/bin/python bench/proctrees.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from common import Section, Stats, build, interleaved

from writewatchd.kernel import ProcessIdentity
from writewatchd.kernel.inject import inject_userfaultfd
from writewatchd.kernel.procevents import ProcEvent, ProcEventKind, ProcEventListener
from writewatchd.tracking.tracker import Tracker

_MODES = ("plain", "uffd", "eventfork")


def fork_costs(rounds: int, forks_per_round: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per mode: (median fork() ns per round, median fork->monitor ns per round)."""

    def one(mode: str) -> float:
        out = subprocess.run(
            [str(build("proctree")), "forkcost", mode, str(forks_per_round)], capture_output=True, text=True, check=True
        ).stdout
        pairs = [tuple(float(x) for x in line.split()) for line in out.splitlines()]
        monitor[mode].append(Stats.of([p[1] for p in pairs]).median)
        return Stats.of([p[0] for p in pairs]).median

    monitor: dict[str, list[float]] = {mode: [] for mode in _MODES}
    samples = interleaved(rounds, [lambda m=mode: one(m) for mode in _MODES])  # type: ignore[misc]
    return {mode: (samples[i], monitor[mode]) for i, mode in enumerate(_MODES)}


class _Server:
    """bench/fixtures/proctree.c serve: forks and execs on command."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [str(build("proctree")), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.children: list[int] = []
        self.ready()

    def ready(self) -> int:
        assert self.proc.stdout is not None
        word, pid = self.proc.stdout.readline().split()
        assert word == "ready", word
        return int(pid)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        for pid in self.children:
            os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()


def _wait_event(listener: ProcEventListener, kind: ProcEventKind, tgid: int, *, parent: bool = False) -> ProcEvent:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for event in listener.read(0.5):
            matches = event.kind == kind and (event.parent_tgid if parent else event.tgid) == tgid
            if matches and (kind != ProcEventKind.FORK or event.is_new_process):
                return event
    raise TimeoutError(f"no {kind.name} event for {tgid}")


def _arm(pid: int) -> None:
    uffd = inject_userfaultfd(pid).uffd
    tracker = Tracker(ProcessIdentity.of(pid), uffd, auto=True)
    tracker.close()


def follow_latencies(rounds: int) -> dict[str, list[float]]:
    """ns from the kernel's timestamp of each exec and fork to: the event read, tracking armed."""
    out: dict[str, list[float]] = {k: [] for k in ("exec event", "exec armed", "fork event", "fork armed")}
    server = _Server()
    try:
        with ProcEventListener() as listener:
            for _ in range(rounds):
                server.send("e")
                event = _wait_event(listener, ProcEventKind.EXEC, server.proc.pid)
                out["exec event"].append(time.monotonic_ns() - event.timestamp_ns)
                _arm(server.proc.pid)
                out["exec armed"].append(time.monotonic_ns() - event.timestamp_ns)
                server.ready()
                server.send("f")
                event = _wait_event(listener, ProcEventKind.FORK, server.proc.pid, parent=True)
                out["fork event"].append(time.monotonic_ns() - event.timestamp_ns)
                _arm(event.pid)
                out["fork armed"].append(time.monotonic_ns() - event.timestamp_ns)
                server.children.append(event.pid)
                assert server.proc.stdout is not None
                server.proc.stdout.readline()
    finally:
        server.close()
    return out


def run(quick: bool) -> Section:
    """Both parts, as one RESULTS.md section."""
    rounds, forks = (3, 20) if quick else (15, 200)
    section = Section(
        "9. Following exec and fork (bench/proctrees.py)",
        "pick per case between UFFD_FEATURE_EVENT_FORK and the process-events connector; "
        "measure exec -> re-armed, fork -> child tracked, and the cost a followed fork adds to fork().",
        ["what", "median ms (min-max over rounds)", "vs untracked fork()"],
    )
    costs = fork_costs(rounds, forks)
    plain = costs["plain"][0]
    for mode, label in (
        ("plain", "fork() untracked, 64 MiB touched"),
        ("uffd", "fork() tracked, no uffd events (writewatch; the connector adds nothing here)"),
        ("eventfork", "fork() tracked with UFFD_FEATURE_EVENT_FORK + monitor thread"),
    ):
        fork_ns, _ = costs[mode]
        ratio = Stats.of([c / b for c, b in zip(fork_ns, plain, strict=True)])
        section.add(label, Stats.of(fork_ns).fmt(3, 1e6), f"{ratio.median:.2f}x")
    section.add(
        "EVENT_FORK: fork() entry -> monitor holds the child's uffd", Stats.of(costs["eventfork"][1]).fmt(3, 1e6), ""
    )
    latencies = follow_latencies(rounds * 2)
    for what, label in (
        ("exec event", "connector: exec -> event read"),
        ("exec armed", "connector: exec -> new program re-armed (inject + auto ranges)"),
        ("fork event", "connector: fork -> event read"),
        ("fork armed", "connector: fork -> child armed (inject + auto ranges)"),
    ):
        section.add(label, Stats.of(latencies[what]).fmt(3, 1e6), "")
    section.evidence.append(
        f"{rounds} interleaved rounds of {forks} forks per mode (median per round); "
        f"{rounds * 2} exec and fork follows of bench/fixtures/proctree.c serve. Times from the kernel's "
        "event timestamp (CLOCK_MONOTONIC) to this process's clock; the writes a program makes before "
        "it is armed are covered by the RESYNC its session starts with."
    )
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(run(args.quick).markdown())


if __name__ == "__main__":
    sys.exit(main())
