"""Tick intervals and the :class:`Ticker` that harvests every session of one interval.

Sessions that share a tick interval share one ticker: one worker-thread call per tick
harvests all of them, because the hand-off to a thread costs more than an idle harvest.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import Executor
from typing import Protocol

from .._exceptions import UsageError
from .hub import Published

__all__ = ["MAX_TICK_INTERVAL_MS", "Tickable", "Ticker", "tick_interval_ms"]

MAX_TICK_INTERVAL_MS = 3_600_000


def tick_interval_ms(requested_ms: int, *, default_ms: int, min_ms: int) -> int:
    """The tick interval a session gets for ``requested_ms`` (0: the default); raises :class:`UsageError`."""
    if requested_ms > MAX_TICK_INTERVAL_MS:
        raise UsageError(f"tick_interval_ms must be <= {MAX_TICK_INTERVAL_MS}")
    if requested_ms == 0:
        return default_ms
    if requested_ms < min_ms:
        raise UsageError(f"tick_interval_ms {requested_ms} is below the minimum {min_ms}")
    return requested_ms


class Tickable(Protocol):
    """What a ticker needs of a session (:class:`~.sessions.ManagedSession` is one)."""

    @property
    def session_id(self) -> str:
        """The session's id."""

    @property
    def active(self) -> bool:
        """Whether the session is still harvested."""

    @property
    def harvest_lock(self) -> asyncio.Lock:
        """Held by whoever harvests the session; a tick skips a session whose lock is held."""

    def harvest_blocking(self) -> Published | None:
        """One harvest, in a worker thread, with :attr:`harvest_lock` held."""

    async def complete_harvest(self, outcome: Published | BaseException | None) -> None:
        """Publish what :meth:`harvest_blocking` returned, or settle what it raised."""


class Ticker:
    """Harvests every session of one tick interval, in one worker-thread call per tick."""

    def __init__(self, executor: Executor, interval_ms: int) -> None:
        self.interval_ms = interval_ms
        self._executor = executor
        self._sessions: dict[str, Tickable] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, session: Tickable) -> None:
        """Harvest ``session`` from the next tick on."""
        self._sessions[session.session_id] = session
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"ticker-{self.interval_ms}ms")

    def discard(self, session: Tickable) -> None:
        """Stop harvesting ``session``."""
        self._sessions.pop(session.session_id, None)

    async def stop(self) -> None:
        """Cancel the tick loop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval_s = self.interval_ms / 1000
        next_tick = time.monotonic()
        while self._sessions:
            # The first tick comes one interval after the start: a session just created (and
            # harvested) must not lose its caller's first writes to an immediate tick.
            next_tick += interval_s
            delay = next_tick - time.monotonic()
            if delay < 0:
                next_tick = time.monotonic()  # fell behind: do not burst to catch up
                delay = 0
            await asyncio.sleep(delay)
            # A session whose lock is held is being harvested on demand right now.
            due = [s for s in self._sessions.values() if s.active and not s.harvest_lock.locked()]
            if not due:
                continue
            for session in due:
                await session.harvest_lock.acquire()  # uncontended: returns without suspending
            try:
                outcomes = await loop.run_in_executor(self._executor, _harvest_all, due)
                for session, outcome in zip(due, outcomes, strict=True):
                    await session.complete_harvest(outcome)
            finally:
                for session in due:
                    session.harvest_lock.release()


def _harvest_all(sessions: list[Tickable]) -> list[Published | BaseException | None]:
    outcomes: list[Published | BaseException | None] = []
    for session in sessions:
        try:
            outcomes.append(session.harvest_blocking())
        except Exception as exc:
            outcomes.append(exc)
    return outcomes
