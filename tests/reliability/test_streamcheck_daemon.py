"""The stream checker on real streams: a real daemon, a real target, exact coverage."""

from __future__ import annotations

import pytest

import writewatch
from reliability.streamcheck import CheckedSubscription, StreamChecker
from targets import NO_TICKS_MS, CoopTarget


@pytest.mark.parametrize("tick_interval_ms", [2, NO_TICKS_MS])
def test_real_streams_pass_the_checker(client: writewatch.Client, tick_interval_ms: int) -> None:
    target = CoopTarget(256)
    try:
        session = client.attach(
            target.pid,
            ranges=[(target.base, target.end)],
            uffd_fd=target.uffd_fd,
            tick_interval_ms=tick_interval_ms,
        )
        subs = [CheckedSubscription(session, StreamChecker(f"sub{i}", base_address=target.base)) for i in range(2)]
        written: set[int] = set()
        for seed in range(30):
            written |= target.random_writes(seed, 20)
            session.harvest()
        last = session.info()
        for sub in subs:
            sub.wait_for_seq(last.last_seq, epoch=last.epoch)
            sub.checker.check_covers(written)
        # A subscriber resuming from another's cursor continues without gap or duplicate.
        resumed = CheckedSubscription(
            session, StreamChecker("resumed", resume=subs[0].checker.cursor, base_address=target.base)
        )
        more = target.random_writes(99, 20)
        session.harvest()
        last = session.info()
        resumed.wait_for_seq(last.last_seq)
        resumed.checker.check_covers(more)
        target.exit()
        for sub in [*subs, resumed]:
            sub.join()
    finally:
        target.kill()
