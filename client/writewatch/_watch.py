"""The live view of a session's writes (``writewatch watch``), reusable by other programs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ._async_client import AsyncClient, AsyncSession
from ._client import Client
from ._proto.writewatch.v1 import writewatch_pb2 as pb
from ._types import Delta
from .regions import DEFAULT_PAGE_SIZE_BYTES

__all__ = ["WatchStats", "format_bytes", "watch_session", "watch_session_async"]

_RATE_WINDOW_S = 1.0
_N_BUSIEST = 5
_REFRESH_S = 0.25


def format_bytes(size_bytes: float) -> str:
    """Human-readable binary size: ``1.5 MiB``."""
    if abs(size_bytes) < 1024:
        return f"{size_bytes:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        size_bytes /= 1024
        if abs(size_bytes) < 1024:
            return f"{size_bytes:.1f} {unit}"
    return f"{size_bytes / 1024:.1f} TiB"


@dataclass
class WatchStats:
    """Counters of a watched stream: totals, a sliding-window rate and pages per tracked range."""

    session_id: str
    pid: int
    ranges: np.ndarray[tuple[int, int], np.dtype[np.uint64]]
    started_s: float = field(default_factory=time.monotonic)
    n_deltas: int = 0
    n_resyncs: int = 0
    n_regions: int = 0
    n_pages: int = 0
    page_size_bytes: int = DEFAULT_PAGE_SIZE_BYTES
    epoch: int = 0
    first_seq: int = 0
    last_seq: int = 0
    pages_per_range: np.ndarray[tuple[int], np.dtype[np.float64]] = field(init=False)
    _recent: deque[tuple[float, int, int]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.pages_per_range = np.zeros(len(self.ranges) + 1)

    @classmethod
    def for_session(cls, snapshot: pb.Session) -> WatchStats:
        """Empty statistics over the session's tracked ranges."""
        return cls(snapshot.session_id, snapshot.pid, _ranges_array(snapshot))

    def set_ranges(self, snapshot: pb.Session) -> None:
        """Follow the tracked ranges as they change; ranges that stay keep their counts."""
        kept = {(int(s), int(e)): n for (s, e), n in zip(self.ranges.tolist(), self.pages_per_range, strict=False)}
        self.ranges = _ranges_array(snapshot)
        self.pages_per_range = np.zeros(len(self.ranges) + 1)
        for i, (start, end) in enumerate(self.ranges.tolist()):
            self.pages_per_range[i] = kept.get((int(start), int(end)), 0.0)

    def outside_pages(self) -> float:
        """Pages counted outside every known range (auto sessions map new memory)."""
        return float(self.pages_per_range[-1])

    def add(self, delta: Delta, now_s: float | None = None) -> None:
        """Account one delta."""
        now_s = time.monotonic() if now_s is None else now_s
        n_pages = delta.n_pages
        self.n_deltas += 1
        self.n_resyncs += delta.resync
        self.n_regions += delta.n_regions
        self.n_pages += n_pages
        self.page_size_bytes = delta.page_size_bytes
        if self.epoch != delta.epoch or not self.first_seq:
            self.first_seq = delta.first_seq
        self.epoch, self.last_seq = delta.epoch, delta.seq
        self._recent.append((now_s, delta.n_regions, n_pages))
        # Region starts bucketed by tracked range; the last bucket holds anything outside.
        starts = delta.regions[:, 0]
        pages = (delta.regions[:, 1] - starts) // np.uint64(self.page_size_bytes)
        index = np.searchsorted(self.ranges[:, 0], starts, side="right").astype(np.int64) - 1
        if len(self.ranges):
            inside = (index >= 0) & (starts < self.ranges[np.maximum(index, 0), 1])
        else:
            inside = np.zeros(len(starts), dtype=bool)
        bucket = np.where(inside, index, len(self.ranges))
        self.pages_per_range += np.bincount(bucket, weights=pages.astype(np.float64), minlength=len(self.ranges) + 1)

    def rates(self, now_s: float | None = None) -> tuple[float, float]:
        """(regions, pages) per second over the last second."""
        now_s = time.monotonic() if now_s is None else now_s
        while self._recent and self._recent[0][0] < now_s - _RATE_WINDOW_S:
            self._recent.popleft()
        window_s = min(_RATE_WINDOW_S, max(now_s - self.started_s, 1e-9))
        return (
            sum(r for _, r, _ in self._recent) / window_s,
            sum(p for _, _, p in self._recent) / window_s,
        )

    def busiest(self, n: int = _N_BUSIEST) -> list[dict[str, int]]:
        """The n tracked ranges with most written pages (start_address 0 and end 0: outside any)."""
        order = np.argsort(-self.pages_per_range, kind="stable")[:n]
        rows = []
        for i in order.tolist():
            n_pages = int(self.pages_per_range[i])
            if not n_pages:
                break
            start, end = (int(self.ranges[i, 0]), int(self.ranges[i, 1])) if i < len(self.ranges) else (0, 0)
            rows.append(
                {
                    "start_address": start,
                    "end_address": end,
                    "n_pages": n_pages,
                    "size_bytes": n_pages * self.page_size_bytes,
                }
            )
        return rows

    def summary(self, now_s: float | None = None) -> dict[str, Any]:
        """Totals and average rates since the start, JSON-ready."""
        now_s = time.monotonic() if now_s is None else now_s
        elapsed_s = max(now_s - self.started_s, 1e-9)
        return {
            "session_id": self.session_id,
            "pid": self.pid,
            "elapsed_s": round(elapsed_s, 3),
            "n_deltas": self.n_deltas,
            "n_resyncs": self.n_resyncs,
            "n_regions": self.n_regions,
            "n_pages": self.n_pages,
            "size_bytes": self.n_pages * self.page_size_bytes,
            "regions_per_second": self.n_regions / elapsed_s,
            "pages_per_second": self.n_pages / elapsed_s,
            "bytes_per_second": self.n_pages * self.page_size_bytes / elapsed_s,
            "epoch": self.epoch,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "busiest": self.busiest(),
        }

    def render(self, seconds: float | None = None, now_s: float | None = None) -> Group:
        """The live view: header, rates, busiest ranges."""
        now_s = time.monotonic() if now_s is None else now_s
        elapsed_s = now_s - self.started_s
        regions_rate, pages_rate = self.rates(now_s)
        limit = f" / {seconds:g} s" if seconds else ""
        header = Text(
            f"session {self.session_id}  pid {self.pid}  {elapsed_s:.1f} s{limit}  "
            f"epoch {self.epoch} seq {self.last_seq}  deltas {self.n_deltas}",
            style="bold",
        )
        rates = Table("", "last second", "total", box=None, padding=(0, 2))
        rates.add_row("regions/s", f"{regions_rate:,.0f}", f"{self.n_regions:,}")
        rates.add_row("pages/s", f"{pages_rate:,.0f}", f"{self.n_pages:,}")
        page = self.page_size_bytes
        rates.add_row("bytes/s", format_bytes(pages_rate * page), format_bytes(self.n_pages * page))
        rows = self.busiest()
        if not rows:
            return Group(header, rates)
        busiest = Table("busiest range", "pages", "written", box=None, padding=(0, 2))
        for row in rows:
            name = f"0x{row['start_address']:x}-0x{row['end_address']:x}" if row["end_address"] else "(untracked)"
            busiest.add_row(name, f"{row['n_pages']:,}", format_bytes(row["size_bytes"]))
        return Group(header, rates, busiest)


def _ranges_array(snapshot: pb.Session) -> np.ndarray[tuple[int, int], np.dtype[np.uint64]]:
    pairs = sorted((r.start_address, r.end_address) for r in snapshot.ranges)
    return np.array(pairs, dtype=np.uint64).reshape(-1, 2)


async def watch_session_async(
    client_or_address: AsyncClient | Client | str | None,
    session_id: str,
    seconds: float | None = None,
    *,
    console: Console | None = None,
    live: bool = True,
) -> dict[str, Any]:
    """Show a live view of a session's writes for ``seconds`` (None: until it ends); returns the summary.

    The summary is :meth:`WatchStats.summary` plus ``ended``, ``end_reason`` and ``end_message``.
    """
    client, owned = _async_client(client_or_address)
    try:
        session = await client.session(session_id)
        stats = WatchStats.for_session(session.snapshot)
        # Live writes only: the history before now would skew the rates.
        start = (session.snapshot.epoch, session.snapshot.last_seq)
        consumer = asyncio.create_task(_consume(session, stats, start))
        display = Live(stats.render(seconds), console=console, auto_refresh=False) if live else None
        deadline_s = time.monotonic() + seconds if seconds else None
        with display or contextlib.nullcontext():
            while not consumer.done():
                timeout_s = _REFRESH_S if deadline_s is None else min(_REFRESH_S, deadline_s - time.monotonic())
                if timeout_s <= 0:
                    break
                await asyncio.wait({consumer}, timeout=timeout_s)
                if display is not None:
                    display.update(stats.render(seconds), refresh=True)
        if display is not None and console is not None and not console.is_terminal:
            console.line()  # a non-terminal Live leaves its last frame without a newline
        ended = consumer.done()
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer  # re-raises the stream's error, if any
    finally:
        if owned:
            await client.close()
    reason = session.end_reason
    return stats.summary() | {
        "ended": ended,
        "end_reason": reason.name if reason is not None else None,
        "end_message": session.end_message,
    }


def watch_session(
    client_or_address: Client | str | None,
    session_id: str,
    seconds: float | None = None,
    *,
    console: Console | None = None,
    live: bool = True,
) -> dict[str, Any]:
    """Blocking :func:`watch_session_async` (runs its own event loop)."""
    return asyncio.run(watch_session_async(client_or_address, session_id, seconds, console=console, live=live))


def _async_client(client_or_address: AsyncClient | Client | str | None) -> tuple[AsyncClient, bool]:
    if isinstance(client_or_address, AsyncClient):
        return client_or_address, False
    if isinstance(client_or_address, Client):
        source = client_or_address
        return AsyncClient(source.connection, timeout_s=source.timeout_s, retry=source.retry), True
    return AsyncClient(client_or_address), True


async def _consume(session: AsyncSession, stats: WatchStats, start: tuple[int, int]) -> None:
    ranges_read_s = time.monotonic()
    async for delta in session.subscribe(resume=start):
        if delta.resync:
            # A resync follows a change of epoch, often with new mappings: re-read the ranges.
            stats.set_ranges(await session.info())
        outside_before = stats.outside_pages()
        stats.add(delta)
        if stats.outside_pages() > outside_before and time.monotonic() - ranges_read_s > 1.0:
            # Writes outside the known ranges: the session tracks new mappings now.
            stats.set_ranges(await session.info())
            ranges_read_s = time.monotonic()
