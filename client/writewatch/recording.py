"""Recording files: keep what a subscriber received, replay it later (docs/recording.md).

A recording is ``MAGIC``, the format version (u32 little-endian), then framed records: a
``writewatch.v1.RecordingHeader`` first, then ``writewatch.v1.RecordingRecord`` messages
(a delta, a fresh session snapshot, or the end). A frame is the body's length as a protobuf
varint, the body, and the body's CRC-32 (u32 little-endian). Every record is flushed to
the operating system as soon as it is written, so a recorder that is killed leaves a file
that reads up to its last whole record.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import signal
import struct
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from rich.console import Console
from rich.live import Live
from rich.text import Text

from ._async_client import AsyncClient, AsyncSession
from ._client import Client
from ._exceptions import RecordingError, RecordingVersionError, WriteWatchError
from ._proto.writewatch.v1 import recording_pb2 as rpb
from ._proto.writewatch.v1 import writewatch_pb2 as pb
from ._types import Delta, EndReason
from ._watch import _async_client, format_bytes
from ._wire import delta_from_pb, delta_to_pb
from .regions import DEFAULT_PAGE_SIZE_BYTES, Regions

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Recording",
    "RecordingStop",
    "RecordingTruncatedWarning",
    "RecordingWriter",
    "read_recording",
    "record_session",
    "record_session_async",
    "session_ranges",
]

MAGIC = b"\x89WWREC\r\n"
"""First 8 bytes of every recording (the 0x89 and CR LF catch text-mode transfers, as in PNG)."""
FORMAT_VERSION = 1
"""Format version this client writes and the newest it reads."""

_VERSION = struct.Struct("<I")
_CRC = struct.Struct("<I")
_MAX_VARINT_BYTES = 10
# A larger length is not a record of ours: corrupt data, not a giant delta.
_MAX_RECORD_BYTES = 1 << 31
_REFRESH_S = 0.25
_RANGES_REFRESH_S = 1.0


class RecordingStop(enum.IntEnum):
    """Why a recording stopped (``writewatch.v1.RecordingStop``)."""

    UNSPECIFIED = 0
    SESSION_ENDED = 1
    DURATION = 2
    INTERRUPTED = 3
    ERROR = 4


class RecordingTruncatedWarning(UserWarning):
    """A recording ends inside a record (its recorder was killed); the whole records were read."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def session_ranges(snapshot: pb.Session) -> Regions:
    """The tracked ranges of a session snapshot as a sorted ``(n, 2)`` uint64 array."""
    pairs = sorted((r.start_address, r.end_address) for r in snapshot.ranges)
    return np.array(pairs, dtype=np.uint64).reshape(-1, 2)


class RecordingWriter:
    """Writes a recording: the header at creation, then one record per call, each flushed."""

    def __init__(self, path: str | os.PathLike[str], header: rpb.RecordingHeader) -> None:
        self.path = Path(path)
        self._file: IO[bytes] = self.path.open("wb")
        self.n_deltas = 0
        self.n_pages = 0
        self.size_bytes = 0
        try:
            self._file.write(MAGIC + _VERSION.pack(FORMAT_VERSION))
            self.size_bytes = len(MAGIC) + _VERSION.size
            self._write(header.SerializeToString())
        except BaseException:
            self._file.close()
            raise

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _write(self, body: bytes) -> None:
        frame = _varint(len(body)) + body + _CRC.pack(zlib.crc32(body))
        self._file.write(frame)
        # To the kernel at once: a killed recorder loses no whole record.
        self._file.flush()
        self.size_bytes += len(frame)

    def write_delta(self, delta: Delta) -> None:
        """Append one delta."""
        self._write(rpb.RecordingRecord(delta=delta_to_pb(delta)).SerializeToString())
        self.n_deltas += 1
        self.n_pages += delta.n_pages

    def write_session(self, snapshot: pb.Session) -> None:
        """Append a session snapshot (the tracked ranges changed)."""
        self._write(rpb.RecordingRecord(session=snapshot).SerializeToString())

    def write_end(self, stop: RecordingStop, end_reason: EndReason = EndReason.UNSPECIFIED, message: str = "") -> None:
        """Append the end record: why recording stopped, and why the session ended if it did."""
        end = rpb.RecordingEnd(
            stop=stop,  # type: ignore[arg-type]
            end_reason=end_reason,  # type: ignore[arg-type]
            message=message,
            stopped_at_unix_ns=time.time_ns(),
            n_deltas=self.n_deltas,
        )
        self._write(rpb.RecordingRecord(end=end).SerializeToString())

    def close(self) -> None:
        """Close the file."""
        self._file.close()


@dataclass
class _Frame:
    body: bytes | None
    """The record body; None at a clean end of file."""
    n_trailing_bytes: int = 0
    """Bytes of a partial record at the end of the file (then body is None)."""


def _read_frame(file: IO[bytes], path: Path, offset: int) -> _Frame:
    length = 0
    shift = 0
    n_read = 0
    while True:
        byte = file.read(1)
        if not byte:
            return _Frame(None, n_read)
        n_read += 1
        length |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            break
        shift += 7
        if n_read == _MAX_VARINT_BYTES:
            raise RecordingError(f"{path}: bad record length at byte {offset}: corrupt recording")
    if length > _MAX_RECORD_BYTES:
        raise RecordingError(f"{path}: record of {length} bytes at byte {offset}: corrupt recording")
    rest = file.read(length + _CRC.size)
    if len(rest) < length + _CRC.size:
        return _Frame(None, n_read + len(rest))
    body = rest[:length]
    if _CRC.unpack_from(rest, length)[0] != zlib.crc32(body):
        raise RecordingError(f"{path}: record at byte {offset} fails its CRC check: corrupt recording")
    return _Frame(body)


class Recording:
    """A recording opened for reading: the header at once, the deltas by iterating.

    Iterating yields the :class:`writewatch.Delta` objects ``subscribe()`` yielded, in order,
    and may be repeated. After an iteration, ``complete`` says whether the recorder closed the
    file itself (``end`` holds its end record), and ``truncated`` whether the file ends inside
    a record (the recorder was killed mid-write): the whole records before it were read,
    ``n_trailing_bytes`` were ignored and a :class:`RecordingTruncatedWarning` was issued.

    Raises :class:`writewatch.RecordingError` for a file that is not a recording or is
    corrupt, :class:`writewatch.RecordingVersionError` for a newer format version, and
    ``OSError`` when the file cannot be read.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with self.path.open("rb") as file:
            magic = file.read(len(MAGIC))
            if magic != MAGIC:
                raise RecordingError(f"{self.path} is not a writewatch recording")
            raw_version = file.read(_VERSION.size)
            if len(raw_version) < _VERSION.size:
                raise RecordingError(f"{self.path}: truncated before its format version")
            self.format_version: int = _VERSION.unpack(raw_version)[0]
            if self.format_version > FORMAT_VERSION or self.format_version == 0:
                raise RecordingVersionError(
                    f"{self.path} is a recording of format version {self.format_version}; this writewatch reads "
                    f"versions 1 to {FORMAT_VERSION} (upgrade writewatch to read it)",
                    self.format_version,
                )
            frame = _read_frame(file, self.path, file.tell())
            if frame.body is None:
                raise RecordingError(f"{self.path}: truncated inside its header: no record can be read")
            self.header = rpb.RecordingHeader.FromString(frame.body)
            self._records_offset = file.tell()
        self.end: rpb.RecordingEnd | None = None
        self.truncated = False
        self.n_trailing_bytes = 0
        self.range_snapshots: list[Regions] = [session_ranges(self.session)]
        """Tracked ranges of the header's and every later session snapshot (complete after an iteration)."""

    def __repr__(self) -> str:
        return f"Recording({str(self.path)!r}, session={self.session.session_id!r})"

    @property
    def session(self) -> pb.Session:
        """The session as the recording started."""
        return self.header.session

    @property
    def page_size_bytes(self) -> int:
        """Base page size of the target."""
        return self.header.page_size_bytes or DEFAULT_PAGE_SIZE_BYTES

    @property
    def started_at_unix_ns(self) -> int:
        """When recording started."""
        return self.header.started_at_unix_ns

    @property
    def daemon_version(self) -> str:
        """Version of the daemon that produced the deltas."""
        return self.header.daemon_version

    @property
    def complete(self) -> bool:
        """Whether the recorder wrote the end record (known after an iteration)."""
        return self.end is not None

    def records(self) -> Iterator[Delta | pb.Session | rpb.RecordingEnd]:
        """Every record after the header: deltas, session snapshots, the end record."""
        self.end = None
        self.truncated = False
        self.n_trailing_bytes = 0
        self.range_snapshots = self.range_snapshots[:1]
        with self.path.open("rb") as file:
            file.seek(self._records_offset)
            while True:
                offset = file.tell()
                frame = _read_frame(file, self.path, offset)
                if frame.body is None:
                    if frame.n_trailing_bytes:
                        self.truncated = True
                        self.n_trailing_bytes = frame.n_trailing_bytes
                        warnings.warn(
                            f"{self.path} ends inside a record (the recorder was killed?): read up to byte "
                            f"{offset}, ignored the last {frame.n_trailing_bytes} bytes",
                            RecordingTruncatedWarning,
                            stacklevel=2,
                        )
                    return
                if self.end is not None:
                    raise RecordingError(f"{self.path}: record at byte {offset} after the end record")
                record = rpb.RecordingRecord.FromString(frame.body)
                kind = record.WhichOneof("record")
                if kind == "delta":
                    yield delta_from_pb(record.delta)
                elif kind == "session":
                    self.range_snapshots.append(session_ranges(record.session))
                    yield record.session
                elif kind == "end":
                    self.end = record.end
                    yield record.end
                # Record kinds of a newer minor revision are skipped: the format version would
                # change if they mattered to a reader.

    def __iter__(self) -> Iterator[Delta]:
        for record in self.records():
            if isinstance(record, Delta):
                yield record

    def deltas(self) -> list[Delta]:
        """Every delta, read into a list."""
        return list(self)


def read_recording(path: str | os.PathLike[str]) -> Recording:
    """Open a recording made by ``writewatch record``; iterate it for its deltas (see :class:`Recording`)."""
    return Recording(path)


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
