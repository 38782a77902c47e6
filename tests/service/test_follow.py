"""Following children in an in-process daemon: what the follower counts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

import writewatch
from targets import NO_TICKS_MS
from treeprogs import Programs
from writewatchd.service import Daemon, Settings
from writewatchd.service.metrics import session_registry


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    daemon = Daemon(Settings(listen=f"unix:{tmp_path / 'd.sock'}", state_dir=tmp_path / "state"))
    await daemon.start()
    yield daemon
    await daemon.stop(grace_s=0)


async def test_children_that_exit_at_once_leave_no_session_and_are_counted(daemon: Daemon, tmp_path: Path) -> None:
    programs = Programs(tmp_path)
    try:
        async with writewatch.AsyncClient(daemon.address) as client:
            root = await client.spawn(programs.argv("flasher"), follow_children=True, tick_interval_ms=NO_TICKS_MS)
            flasher = await asyncio.to_thread(programs.wait, "flasher")
            await asyncio.to_thread(flasher.command, "flash 20")
            counters = daemon.manager.follower.counters
            for _ in range(500):
                settled = counters.n_children_exited_early + counters.n_children_adopted + counters.n_children_failed
                if settled >= 20 and not daemon.manager.follower.pending:
                    break
                await asyncio.sleep(0.02)
            assert counters.n_children_exited_early + counters.n_children_adopted + counters.n_children_failed == 20
            assert counters.n_children_exited_early >= 1
            # Children adopted in the instant before their exit have ended; none is left active.
            for _ in range(500):
                if [s.id for s in await client.sessions()] == [root.id]:
                    break
                await asyncio.sleep(0.02)
            assert [s.id for s in await client.sessions()] == [root.id]
            text = generate_latest(session_registry(daemon.manager)).decode()
            assert f"writewatchd_follow_children_exited_early_total {float(counters.n_children_exited_early)}" in text
            await root.close(recursive=True)
    finally:
        programs.close()
