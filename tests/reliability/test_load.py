"""Load: many sessions, many subscribers disconnecting and resuming at random, zero missed pages.

Every subscriber is one :class:`StreamChecker` for its whole life: each reconnect resumes
from the checker's cursor, so the checker sees one continuous stream and any gap, duplicate
or missing page fails. The default run is small; ``WRITEWATCH_SOAK=1`` runs 100 sessions x
10 subscribers for 60 s. The daemon's peak RSS is reported.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import writewatch
from daemonproc import DaemonProcess
from reliability.streamcheck import StreamChecker
from targets import CoopTarget

SOAK = os.environ.get("WRITEWATCH_SOAK") == "1"
N_SESSIONS, N_SUBSCRIBERS, DURATION_S = (100, 10, 60.0) if SOAK else (10, 3, 5.0)
TICK_MS = 10
STREAMS_PER_CLIENT = 50


@dataclass
class Subscriber:
    """One logical subscriber: its checker survives every disconnect."""

    checker: StreamChecker
    task: asyncio.Task[None] | None = None
    n_connects: int = 0
    error: BaseException | None = None
    ended: str = ""
    """How the last connection's stream ended by itself (it never should: the sessions go on)."""


@dataclass
class Tracked:
    target: CoopTarget
    session_id: str
    written: set[int] = field(default_factory=set)
    n_writes: int = 0
    subscribers: list[Subscriber] = field(default_factory=list)


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))


@pytest.fixture
def targets() -> Iterator[list[CoopTarget]]:
    started = [CoopTarget(128) for _ in range(N_SESSIONS)]
    yield started
    for target in started:
        target.kill()


async def _consume(client: writewatch.AsyncClient, session_id: str, sub: Subscriber) -> None:
    # Every call counts: a failed GetSession used to kill the task unseen, and the subscriber
    # then looked like a stream that hung.
    try:
        session = await client.session(session_id)
        sub.n_connects += 1
        async for delta in session.subscribe(resume=sub.checker.cursor):
            sub.checker.feed(delta)
        sub.ended = f"stream returned at {sub.checker.cursor}: {session.end_reason!r} {session.end_message!r}"
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        sub.error = exc


def _write_round(tracked: list[Tracked], seed: int) -> None:
    for t in tracked:
        pages = t.target.random_writes(seed, 8)
        t.written |= pages
        t.n_writes += 8


async def test_sessions_and_subscribers_under_random_disconnects_miss_nothing(
    daemon: DaemonProcess, targets: list[CoopTarget], capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(100)
    n_clients = max(1, N_SESSIONS * N_SUBSCRIBERS // STREAMS_PER_CLIENT)
    clients = [writewatch.AsyncClient(daemon.address, timeout_s=60) for _ in range(n_clients)]
    subs: list[tuple[Tracked, Subscriber]] = []
    try:
        tracked: list[Tracked] = []
        for i, target in enumerate(targets):
            session = await clients[i % n_clients].attach(
                target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=TICK_MS
            )
            tracked.append(Tracked(target, session.id))
        for t in tracked:
            for j in range(N_SUBSCRIBERS):
                sub = Subscriber(StreamChecker(f"{t.session_id}/{j}", base_address=t.target.base))
                t.subscribers.append(sub)
                subs.append((t, sub))

        def connect(index: int, t: Tracked, sub: Subscriber) -> None:
            sub.task = asyncio.create_task(_consume(clients[index % n_clients], t.session_id, sub))

        for index, (t, sub) in enumerate(subs):
            connect(index, t, sub)

        n_disconnects = 0
        seed = 0
        deadline = time.monotonic() + DURATION_S
        while time.monotonic() < deadline:
            seed += 1
            await asyncio.to_thread(_write_round, tracked, seed)
            for _ in range(max(1, len(subs) // 50)):
                index = rng.randrange(len(subs))
                t, sub = subs[index]
                assert sub.task is not None
                sub.task.cancel()
                await asyncio.gather(sub.task, return_exceptions=True)
                n_disconnects += 1
                connect(index + rng.randrange(n_clients), t, sub)
            await asyncio.sleep(rng.uniform(0, 0.02))

        # Every write is in a published delta once a harvest ran after it; then every
        # subscriber must reach that seq with exactly the pages its target wrote.
        for i, t in enumerate(tracked):
            session = await clients[i % n_clients].session(t.session_id)
            await session.harvest()
            info = await session.info()
            for sub in t.subscribers:
                wait_until = time.monotonic() + 60
                while sub.checker.cursor is None or sub.checker.cursor < (info.epoch, info.last_seq):
                    assert sub.error is None, f"{sub.checker.name}: {sub.error!r}"
                    assert time.monotonic() < wait_until, (
                        f"{sub.checker.name} stuck at {sub.checker.cursor} of {(info.epoch, info.last_seq)} "
                        f"after {sub.n_connects} connects; {sub.ended or 'its stream is open'}; "
                        f"{info.statistics.n_subscribers} subscribers on the daemon"
                    )
                    await asyncio.sleep(0.01)
                sub.checker.check_covers(t.written)
        peak_kib = _peak_rss_kib(daemon.pid)
        n_writes = sum(t.n_writes for t in tracked)
        n_checked = sum(len(t.written) * len(t.subscribers) for t in tracked)
        n_deltas = sum(sub.checker.n_deltas for _, sub in subs)
        with capsys.disabled():
            print(
                f"\nload: {N_SESSIONS} sessions x {N_SUBSCRIBERS} subscribers for {DURATION_S:g} s: "
                f"{n_writes} writes, {n_checked} (page, subscriber) pairs checked, {n_deltas} deltas, "
                f"{n_disconnects} disconnects, {sum(s.n_connects for _, s in subs)} connects; "
                f"daemon peak RSS {peak_kib / 1024:.1f} MiB"
            )
        assert n_disconnects > 0
    finally:
        for _, sub in subs:
            if sub.task is not None:
                sub.task.cancel()
        await asyncio.gather(*(s.task for _, s in subs if s.task is not None), return_exceptions=True)
        for client in clients:
            await client.close()
