"""The recording file format: writer and reader (docs/recording.md).

A recording is ``MAGIC``, the format version (u32 little-endian), then framed records: a
``writewatch.v1.RecordingHeader`` first, then ``writewatch.v1.RecordingRecord`` messages
(a delta, a fresh session snapshot, or the end). A frame is the body's length as a protobuf
varint, the body, and the body's CRC-32 (u32 little-endian). Every record is flushed to
the operating system as soon as it is written, so a recorder that is killed leaves a file
that reads up to its last whole record.
"""

from __future__ import annotations

import enum
import os
import struct
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message

from ._exceptions import RecordingError, RecordingVersionError
from ._proto.writewatch.v1 import recording_pb2 as rpb
from ._proto.writewatch.v1 import writewatch_pb2 as pb
from ._types import Delta, EndReason
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


_Message = TypeVar("_Message", bound=Message)


def _parse(kind: type[_Message], body: bytes, path: Path, what: str) -> _Message:
    try:
        return kind.FromString(body)
    except DecodeError:
        raise RecordingError(f"{path}: {what} is not a {kind.DESCRIPTOR.name}: corrupt recording") from None


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
            self.header = _parse(rpb.RecordingHeader, frame.body, self.path, "its header")
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
                record = _parse(rpb.RecordingRecord, frame.body, self.path, f"the record at byte {offset}")
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
