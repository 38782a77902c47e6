"""Exporter pieces without servers: fragment sizing, the reader's assembly, stream checks, decode_delta."""

from __future__ import annotations

import numpy as np
import pytest

import writewatch
from writewatch import pb
from writewatch.export import ExportAssembler, check_stream_config, fit_fragments
from writewatch.regions import encode_regions, split_regions

PAGE = 4096
SUBJECT = "writewatch.h1.s-1"


def _regions(n: int) -> np.ndarray:
    starts = np.arange(n, dtype=np.uint64) * np.uint64(2 * PAGE) + np.uint64(0x10000000)
    return np.stack([starts, starts + np.uint64(PAGE)], axis=1)


def _wire(regions: np.ndarray, *, seq: int, max_bytes: int = 1 << 20, resync: bool = False) -> list[pb.Delta]:
    chunks = split_regions(regions, max_bytes)
    return [
        pb.Delta(
            session_id="s-1",
            epoch=7,
            seq=seq,
            first_seq=seq,
            resync=resync,
            regions=encode_regions(chunk),
            fragment_index=index,
            n_fragments=len(chunks),
        )
        for index, chunk in enumerate(chunks)
    ]


def _join(messages: list[pb.Delta]) -> writewatch.Delta:
    assembler = writewatch.FragmentAssembler()
    results = [assembler.add(writewatch.decode_delta(m.SerializeToString())) for m in messages]
    assert all(r is None for r in results[:-1])
    assert results[-1] is not None
    return results[-1]


def test_fragments_fit_the_message_size_and_join_to_the_delta() -> None:
    regions = _regions(5000)
    fitted = fit_fragments(_wire(regions, seq=3), 8192)
    assert len(fitted) > 4
    assert all(m.ByteSize() <= 8192 - 256 for m in fitted)
    joined = _join(fitted)
    assert np.array_equal(joined.regions, regions)
    assert (joined.epoch, joined.seq, joined.n_fragments) == (7, 3, 1)
    again = fit_fragments(_wire(regions, seq=3), 8192)
    assert [m.SerializeToString() for m in again] == [m.SerializeToString() for m in fitted]


def test_fragments_that_fit_pass_unchanged() -> None:
    messages = _wire(_regions(3000), seq=1, max_bytes=4096)
    assert len(messages) == 6
    assert fit_fragments(messages, 1 << 20) == messages


def test_a_too_small_message_size_is_refused() -> None:
    with pytest.raises(writewatch.WriteWatchError, match="too small"):
        fit_fragments(_wire(_regions(10), seq=1), 300)


def test_reader_drops_an_incomplete_delta_and_repeats() -> None:
    reader = ExportAssembler()
    half = fit_fragments(_wire(_regions(3000), seq=5), 8192)
    assert len(half) > 2
    stored = [half[0], half[1]]  # the exporter died here
    stored += _wire(_regions(10), seq=4)[:1]  # a republish of a delivered delta
    whole = _wire(_regions(20), seq=6)
    stored += [whole[0], whole[0]]  # stored twice (republished after the de-duplication window)
    delivered = [reader.add(SUBJECT, m.SerializeToString()) for m in [*_wire(_regions(10), seq=4), *stored]]
    got = [(host, delta.seq) for item in delivered if item is not None for host, delta in [item]]
    assert got == [("h1", 4), ("h1", 6)]
    assert reader.n_dropped_incomplete == 1
    assert reader.n_skipped_duplicates == 2


def test_reader_ignores_events() -> None:
    assert ExportAssembler().add("writewatch.h1.events", b"{}") is None


def test_decode_delta_refuses_garbage() -> None:
    with pytest.raises(writewatch.ProtocolError):
        writewatch.decode_delta(b"\xff\xff\xff")


def test_stream_checks_name_every_problem() -> None:
    from nats.js.api import RetentionPolicy, StreamConfig

    good = StreamConfig(name="WRITEWATCH", subjects=["writewatch.>"], duplicate_window=120)
    assert check_stream_config(good, "h1", 4096) == []
    assert check_stream_config(StreamConfig(subjects=["writewatch.h1.*"], duplicate_window=1), "h1", 4096) == []
    bad = StreamConfig(
        subjects=["writewatch.other.>"],
        retention=RetentionPolicy.INTEREST,
        duplicate_window=0,
        max_msg_size=1000,
    )
    problems = " | ".join(check_stream_config(bad, "h1", 4096))
    assert "do not cover writewatch.h1.s-0" in problems
    assert "retention interest" in problems
    assert "duplicate_window is 0" in problems
    assert "max_msg_size 1000" in problems
