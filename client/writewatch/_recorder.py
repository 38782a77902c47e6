"""The recorder: a session's deltas into a recording file, with a progress line (``writewatch record``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.text import Text

from ._async_client import AsyncClient, AsyncSession
from ._client import Client
from ._exceptions import WriteWatchError
from ._proto.writewatch.v1 import recording_pb2 as rpb
from ._proto.writewatch.v1 import writewatch_pb2 as pb
from ._recordfile import RecordingStop, RecordingWriter, session_ranges
from ._types import EndReason
from ._watch import _async_client, format_bytes
from .regions import DEFAULT_PAGE_SIZE_BYTES, Regions

__all__ = ["record_session", "record_session_async"]

_REFRESH_S = 0.25
_RANGES_REFRESH_S = 1.0


@dataclass
class _Progress:
    """What the recorder has done so far, for the progress line and the summary."""

    path: Path
    session_id: str
    duration_s: float | None
    started_s: float = field(default_factory=time.monotonic)
    n_deltas: int = 0
    n_resyncs: int = 0
    n_pages: int = 0
    page_size_bytes: int = DEFAULT_PAGE_SIZE_BYTES
    epoch: int = 0
    last_seq: int = 0
    file_bytes: int = 0

    def render(self) -> Text:
        elapsed_s = time.monotonic() - self.started_s
        limit = f" / {self.duration_s:g} s" if self.duration_s else ""
        return Text(
            f"recording {self.session_id} -> {self.path}  {elapsed_s:.1f} s{limit}  deltas {self.n_deltas:,}  "
            f"pages {self.n_pages:,} ({format_bytes(self.n_pages * self.page_size_bytes)})  "
            f"epoch {self.epoch} seq {self.last_seq}  file {format_bytes(self.file_bytes)}"
        )


class _Recorder:
    """The subscriber side: deltas into the file, snapshots when the tracked ranges change."""

    def __init__(self, session: AsyncSession, writer: RecordingWriter, progress: _Progress) -> None:
        self.session = session
        self.writer = writer
        self.progress = progress
        self.ranges = session_ranges(session.snapshot)
        self.epoch = session.snapshot.epoch
        self.ranges_read_s = time.monotonic()

    async def run(self, resume: tuple[int, int] | None) -> None:
        async for delta in self.session.subscribe(resume=resume):
            if delta.resync or delta.epoch != self.epoch or self._outside(delta.regions):
                await self._refresh_ranges(force=delta.resync or delta.epoch != self.epoch)
            self.writer.write_delta(delta)
            progress = self.progress
            progress.n_deltas += 1
            progress.n_resyncs += delta.resync
            progress.n_pages += delta.n_pages
            progress.page_size_bytes = delta.page_size_bytes
            progress.epoch, progress.last_seq = delta.epoch, delta.seq
            progress.file_bytes = self.writer.size_bytes

    def _outside(self, regions: Regions) -> bool:
        if not len(regions):
            return False
        if not len(self.ranges):
            return True
        starts = regions[:, 0]
        index = np.searchsorted(self.ranges[:, 0], starts, side="right").astype(np.int64) - 1
        inside = (index >= 0) & (regions[:, 1] <= self.ranges[np.maximum(index, 0), 1])
        return not bool(inside.all())

    async def _refresh_ranges(self, *, force: bool) -> None:
        """Record a fresh snapshot before a delta that the known ranges do not explain."""
        if not force and time.monotonic() - self.ranges_read_s < _RANGES_REFRESH_S:
            return
        self.ranges_read_s = time.monotonic()
        try:
            snapshot = await self.session.info()
        except WriteWatchError:
            # The daemon may be restarting; the next resync or stray write tries again.
            return
        ranges = session_ranges(snapshot)
        if snapshot.epoch != self.epoch or not np.array_equal(ranges, self.ranges):
            self.writer.write_session(snapshot)
            self.ranges, self.epoch = ranges, snapshot.epoch


async def record_session_async(
    client_or_address: AsyncClient | Client | str | None,
    session_id: str,
    path: str | os.PathLike[str],
    duration_s: float | None = None,
    *,
    from_start: bool = False,
    console: Console | None = None,
    handle_signals: bool = False,
) -> dict[str, Any]:
    """Record a session's deltas into ``path`` until it ends, ``duration_s`` passes or a signal.

    Starts with the next delta (``from_start``: at the beginning of the current epoch, history
    or resync). ``console`` shows a progress line; ``handle_signals`` makes SIGINT and SIGTERM
    stop the recording cleanly (the file gets its end record). Raises ``OSError`` when ``path``
    cannot be written and the client's errors for the session (NotFound...) before creating
    the file. Returns a summary (counts, ``stop`` and ``end_reason`` names, ``file_bytes``).
    """
    started_at_unix_ns = time.time_ns()  # before GetSession: every live delta is harvested after it
    client, owned = _async_client(client_or_address)
    try:
        session = await client.session(session_id)
        capabilities = await client.capabilities()
        snapshot = session.snapshot
        if snapshot.state == pb.SESSION_STATE_ENDED and not from_start:
            reason = EndReason(snapshot.end_reason).name
            raise ValueError(f"session {session_id} has ended ({reason}): nothing more to record")
        resume = None if from_start else (snapshot.epoch, snapshot.last_seq)
        header = rpb.RecordingHeader(
            session=snapshot,
            daemon_version=capabilities.daemon_version,
            page_size_bytes=capabilities.page_size_bytes or DEFAULT_PAGE_SIZE_BYTES,
            started_at_unix_ns=started_at_unix_ns,
            recorder=f"writewatch {_client_version()}",
        )
        if resume is not None:
            header.resume_epoch, header.resume_seq = resume
        with RecordingWriter(path, header) as writer:
            progress = _Progress(writer.path, session_id, duration_s, file_bytes=writer.size_bytes)
            progress.page_size_bytes = header.page_size_bytes
            recorder = _Recorder(session, writer, progress)
            stop = await _run(recorder, resume, duration_s, console, handle_signals)
            error = stop.error
            ended = stop.kind == RecordingStop.SESSION_ENDED
            end_reason = (session.end_reason or EndReason.UNSPECIFIED) if ended else EndReason.UNSPECIFIED
            writer.write_end(stop.kind, end_reason, str(error) if error is not None else session.end_message)
            progress.file_bytes = writer.size_bytes
            if error is not None:
                raise error
    finally:
        if owned:
            await client.close()
    return {
        "path": str(writer.path),
        "session_id": session_id,
        "elapsed_s": round(time.monotonic() - progress.started_s, 3),
        "n_deltas": progress.n_deltas,
        "n_resyncs": progress.n_resyncs,
        "n_pages": progress.n_pages,
        "size_bytes": progress.n_pages * progress.page_size_bytes,
        "epoch": progress.epoch,
        "last_seq": progress.last_seq,
        "file_bytes": progress.file_bytes,
        "stop": stop.kind.name,
        "end_reason": end_reason.name if end_reason else None,
    }


@dataclass
class _Stop:
    kind: RecordingStop
    error: BaseException | None = None


async def _run(
    recorder: _Recorder,
    resume: tuple[int, int] | None,
    duration_s: float | None,
    console: Console | None,
    handle_signals: bool,
) -> _Stop:
    """Run the recorder until the session ends, the duration passes or a signal; why it stopped."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    for signum in signals:
        loop.add_signal_handler(signum, interrupted.set)
    consumer = asyncio.create_task(recorder.run(resume))
    waiter = asyncio.create_task(interrupted.wait())
    deadline_s = time.monotonic() + duration_s if duration_s is not None else None
    progress = recorder.progress
    display = Live(progress.render(), console=console, auto_refresh=False, transient=False) if console else None
    try:
        with display or contextlib.nullcontext():
            while not consumer.done() and not interrupted.is_set():
                timeout_s = _REFRESH_S if deadline_s is None else min(_REFRESH_S, deadline_s - time.monotonic())
                if timeout_s <= 0:
                    break
                await asyncio.wait({consumer, waiter}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
                if display is not None:
                    display.update(progress.render(), refresh=True)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        waiter.cancel()
    if consumer.done():
        error = consumer.exception()
        return _Stop(RecordingStop.SESSION_ENDED) if error is None else _Stop(RecordingStop.ERROR, error)
    consumer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await consumer
    return _Stop(RecordingStop.INTERRUPTED if interrupted.is_set() else RecordingStop.DURATION)


def record_session(
    client_or_address: Client | str | None,
    session_id: str,
    path: str | os.PathLike[str],
    duration_s: float | None = None,
    *,
    from_start: bool = False,
    console: Console | None = None,
    handle_signals: bool = False,
) -> dict[str, Any]:
    """Blocking :func:`record_session_async` (runs its own event loop)."""
    return asyncio.run(
        record_session_async(
            client_or_address,
            session_id,
            path,
            duration_s,
            from_start=from_start,
            console=console,
            handle_signals=handle_signals,
        )
    )


def _client_version() -> str:
    from . import __version__

    return __version__
