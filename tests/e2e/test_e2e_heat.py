"""Heat-scheduled scanning through a real daemon: exact, within the staleness bound, coverage on the wire."""

from __future__ import annotations

import threading
import time

import pytest

import writewatch
from targets import CoopTarget

CHUNK_PAGES = 512  # the scheduler's smallest chunk: 2 MiB


@pytest.fixture
def target_pages() -> int:
    return 4 * CHUNK_PAGES


class Arrivals:
    """Every delta of a subscription with its arrival time, on a thread."""

    def __init__(self, session: writewatch.Session) -> None:
        self.deltas: list[tuple[float, writewatch.Delta]] = []
        self._stream = session.subscribe()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for delta in self._stream:
            self.deltas.append((time.monotonic(), delta))

    def first_arrival(self, target: CoopTarget, page: int, after: float) -> float | None:
        for arrived, delta in list(self.deltas):
            if arrived >= after and not delta.resync and page in target.pages(delta.regions):
                return arrived
        return None

    def reported_through(self, target: CoopTarget, barrier: tuple[int, int]) -> set[int]:
        """The pages reported (RESYNCs aside) once the delta at ``barrier`` (epoch, seq) has arrived."""
        deadline = time.monotonic() + 20
        while not self.deltas or (self.deltas[-1][1].epoch, self.deltas[-1][1].seq) < barrier:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return {p for _, d in self.deltas if not d.resync for p in target.pages(d.regions)}


def test_the_bound_is_a_session_setting_shown_by_info(client: writewatch.Client, target: CoopTarget) -> None:
    session = client.attach(
        target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, max_staleness_ms=250
    )
    info = session.info()
    assert info.max_staleness_ms == 250
    assert info.statistics.n_cold_pages + info.statistics.n_hot_pages + info.statistics.n_warm_pages == 4 * 512
    session.close()
    default = client.attach(target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd)
    assert default.info().max_staleness_ms == 1000
    default.close()
    with pytest.raises(writewatch.InvalidArgument, match="max_staleness_ms"):
        client.attach(target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, max_staleness_ms=10**8)


def test_hot_cooling_and_cold_writes_arrive_exactly_and_within_the_bound(
    client: writewatch.Client, target: CoopTarget
) -> None:
    bound_ms = 400
    session = client.attach(
        target.pid,
        ranges=[(target.base, target.end)],
        uffd_fd=target.uffd_fd,
        tick_interval_ms=20,
        max_staleness_ms=bound_ms,
    )
    arrivals = Arrivals(session)
    time.sleep(0.1)
    written: set[int] = set()
    cold_writes: list[tuple[int, float]] = []
    for round_index in range(40):
        # Chunk 0 is written every round (hot); chunk 1 for the first half (it cools down);
        # chunks 2 and 3 only now and then (cold).
        for k in range(8):
            page = (round_index * 13 + k * 37) % CHUNK_PAGES
            target.write(page)
            written.add(page)
        if round_index < 20:
            page = CHUNK_PAGES + round_index * 7
            target.write(page)
            written.add(page)
        if round_index % 10 == 5:
            page = 2 * CHUNK_PAGES + round_index * 11
            target.write(page)
            written.add(page)
            cold_writes.append((page, time.monotonic()))
        time.sleep(0.02)
    # Without a barrier, every cold write arrives within the bound (plus generous slack for a
    # loaded machine): the ticks alone deliver it.
    slack_s = 3.0
    deadline = time.monotonic() + bound_ms / 1000 + slack_s
    while time.monotonic() < deadline and any(
        arrivals.first_arrival(target, page, written_at) is None for page, written_at in cold_writes
    ):
        time.sleep(0.05)
    for page, written_at in cold_writes:
        arrived = arrivals.first_arrival(target, page, written_at)
        assert arrived is not None, f"cold page {page} did not arrive within {bound_ms} ms + {slack_s} s"
        assert arrived - written_at <= bound_ms / 1000 + slack_s
    assert arrivals.reported_through(target, session.flush()) == written
    partial = [d for _, d in arrivals.deltas if d.covered is not None]
    assert partial, "no heat-scheduled tick scanned only part of the target"
    for delta in partial:
        # A delta reports only pages inside the ranges it says it scanned.
        assert target.pages(delta.regions) <= target.pages(delta.covered)
    stats = session.info().statistics
    assert stats.n_ticks_due > 0 and stats.n_harvests > 2
    session.close()


def test_max_staleness_zero_scans_everything_every_tick(client: writewatch.Client, target: CoopTarget) -> None:
    session = client.attach(
        target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=20, max_staleness_ms=0
    )
    arrivals = Arrivals(session)
    time.sleep(0.1)
    target.write(3 * CHUNK_PAGES + 1)
    deadline = time.monotonic() + 10
    while arrivals.first_arrival(target, 3 * CHUNK_PAGES + 1, 0) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert all(d.covered is None for _, d in arrivals.deltas)  # full scans only
    session.close()


def test_a_long_hot_tier_is_published_in_parts_exactly(client: writewatch.Client) -> None:
    """Hot chunks over more than the inline limit (256 MiB) are scanned and published in parts
    as the scan goes: the deltas stay exact, and a tick's part covers a share of the target."""
    target = CoopTarget(1 << 17)  # 512 MiB, never populated but for the pages written
    try:
        session = client.attach(
            target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=50
        )
        arrivals = Arrivals(session)
        written: set[int] = set()
        for _ in range(30):  # 1.5 s: every chunk's scan at the bound finds it hot (1/32 of its pages)
            written |= target.stride_write(0, target.n_pages // 32, 32)
            time.sleep(0.05)
        assert session.info().statistics.n_hot_pages == target.n_pages
        hot_from = len(arrivals.deltas)
        for _ in range(10):  # every chunk is hot: each tick scans all of them, in parts
            written |= target.stride_write(0, target.n_pages // 32, 32)
            time.sleep(0.05)
        epoch, seq = session.flush()
        assert arrivals.reported_through(target, (epoch, seq)) == written
        ticks = [d for _, d in arrivals.deltas[hot_from:] if d.seq < seq]
        shares = [
            None if d.covered is None else int((d.covered[:, 1] - d.covered[:, 0]).sum()) // 4096 / target.n_pages
            for d in ticks
        ]
        assert len(ticks) >= 10 and all(share is not None and 0.25 <= share <= 0.75 for share in shares), shares
        session.close()
    finally:
        target.kill()
