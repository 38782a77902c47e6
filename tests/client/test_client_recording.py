"""The recording file format: round trip, truncation at every byte, foreign and newer files."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

import writewatch
from writewatch._proto.writewatch.v1 import recording_pb2 as rpb
from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb
from writewatch.recording import FORMAT_VERSION, MAGIC, RecordingStop, RecordingWriter

PAGE = 4096
BASE = 0x7F00_0000_0000


def _delta(seq: int, pages: list[tuple[int, int]], *, epoch: int = 7, resync: bool = False) -> writewatch.Delta:
    regions = np.array([(BASE + a * PAGE, BASE + b * PAGE) for a, b in pages], dtype=np.uint64).reshape(-1, 2)
    return writewatch.Delta("s-1", epoch, seq, seq, resync, 1_000_000_000 + seq * 1_000_000, regions)


def _header() -> rpb.RecordingHeader:
    session = pb.Session(session_id="s-1", pid=42, comm="prog", epoch=7, labels={"team": "db"})
    session.ranges.add(start_address=BASE, end_address=BASE + 1024 * PAGE)
    return rpb.RecordingHeader(session=session, daemon_version="0.1.0", page_size_bytes=PAGE, started_at_unix_ns=1)


DELTAS = [
    _delta(1, [(0, 1024)], resync=True),
    _delta(2, [(3, 4), (10, 12)]),
    _delta(3, [(0, 1), (1 << 33, (1 << 33) + 2)]),  # gaps beyond u32 pages: wide pairs
    writewatch.Delta("s-1", 7, 9, 4, False, 5, np.array([(BASE, BASE + PAGE)], dtype=np.uint64)),  # merged 4..9
    _delta(1, [(5, 6)], epoch=8, resync=True),
]


def _key(delta: writewatch.Delta) -> tuple[object, ...]:
    return (delta.session_id, delta.epoch, delta.seq, delta.first_seq, delta.resync, delta.harvested_at_unix_ns,
            delta.regions.tolist(), delta.page_size_bytes)  # fmt: skip


def _write(path: Path, *, end: bool = True) -> None:
    with RecordingWriter(path, _header()) as writer:
        for delta in DELTAS[:3]:
            writer.write_delta(delta)
        moved = pb.Session(session_id="s-1", epoch=8)
        moved.ranges.add(start_address=BASE, end_address=BASE + 2048 * PAGE)
        writer.write_session(moved)
        for delta in DELTAS[3:]:
            writer.write_delta(delta)
        if end:
            writer.write_end(RecordingStop.SESSION_ENDED, writewatch.EndReason.EXITED, "exited with status 0")


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "r.wwrec"
    _write(path)
    recording = writewatch.read_recording(path)
    assert recording.session.comm == "prog" and dict(recording.session.labels) == {"team": "db"}
    assert recording.page_size_bytes == PAGE and recording.daemon_version == "0.1.0"
    assert recording.format_version == FORMAT_VERSION
    assert [_key(d) for d in recording] == [_key(d) for d in DELTAS]
    assert recording.complete and not recording.truncated
    assert recording.end is not None and recording.end.end_reason == pb.END_REASON_EXITED
    assert recording.end.n_deltas == len(DELTAS)
    assert [r.tolist() for r in recording.range_snapshots] == [
        [[BASE, BASE + 1024 * PAGE]],
        [[BASE, BASE + 2048 * PAGE]],
    ]
    assert [_key(d) for d in recording] == [_key(d) for d in DELTAS]  # iterating again gives the same


def test_every_truncation_reads_the_whole_records_before_it(tmp_path: Path) -> None:
    full = tmp_path / "full.wwrec"
    _write(full)
    data = full.read_bytes()
    header_end = len(MAGIC) + 4 + 1 + len(_header().SerializeToString()) + 4
    assert len(_header().SerializeToString()) < 128  # a one-byte length prefix
    cut = tmp_path / "cut.wwrec"
    previous = 0
    for size in range(len(data)):
        cut.write_bytes(data[:size])
        if size < header_end:
            with pytest.raises(writewatch.RecordingError):
                writewatch.read_recording(cut)
            continue
        recording = writewatch.read_recording(cut)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            deltas = list(recording)
        assert [_key(d) for d in deltas] == [_key(d) for d in DELTAS[: len(deltas)]]
        assert len(deltas) >= previous  # a longer prefix never reads fewer records
        previous = len(deltas)
        assert not recording.complete
        assert recording.truncated == bool(caught) == (recording.n_trailing_bytes > 0)
        if recording.truncated:
            assert issubclass(caught[0].category, writewatch.RecordingTruncatedWarning)
            assert "ends inside a record" in str(caught[0].message)
    assert previous == len(DELTAS)


def test_a_recording_killed_between_records_is_valid_but_not_complete(tmp_path: Path) -> None:
    path = tmp_path / "r.wwrec"
    _write(path, end=False)
    recording = writewatch.read_recording(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(recording)) == len(DELTAS)
    assert not recording.complete and not recording.truncated


def test_not_a_recording(tmp_path: Path) -> None:
    for name, data in {"empty": b"", "text": b"hello world\n" * 10, "png": b"\x89PNG\r\n\x1a\n" + bytes(64)}.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(writewatch.RecordingError, match="not a writewatch recording"):
            writewatch.read_recording(path)


def test_a_newer_format_version_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "r.wwrec"
    _write(path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, len(MAGIC), FORMAT_VERSION + 1)
    path.write_bytes(bytes(data))
    with pytest.raises(writewatch.RecordingVersionError, match=f"format version {FORMAT_VERSION + 1}") as caught:
        writewatch.read_recording(path)
    assert caught.value.version == FORMAT_VERSION + 1
    assert isinstance(caught.value, writewatch.WriteWatchError)


def test_a_corrupt_record_is_an_error_not_a_short_read(tmp_path: Path) -> None:
    path = tmp_path / "r.wwrec"
    _write(path)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # inside the end record
    path.write_bytes(bytes(data))
    recording = writewatch.read_recording(path)
    with pytest.raises(writewatch.RecordingError, match="CRC"):
        list(recording)


def test_a_framed_body_that_is_not_the_message_is_corrupt(tmp_path: Path) -> None:
    body = b"\xff\xff\xff"  # an invalid protobuf tag
    path = tmp_path / "r.wwrec"
    frame = bytes([len(body)]) + body + struct.pack("<I", zlib.crc32(body))
    path.write_bytes(MAGIC + struct.pack("<I", FORMAT_VERSION) + frame)
    with pytest.raises(writewatch.RecordingError, match="its header is not a RecordingHeader"):
        writewatch.read_recording(path)


def test_a_missing_file_is_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        writewatch.read_recording(tmp_path / "none.wwrec")
