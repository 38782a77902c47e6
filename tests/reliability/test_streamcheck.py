"""The stream checker itself: good traces pass, every kind of bad trace fails."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import writewatch
from reliability.streamcheck import StreamChecker, StreamViolation

PAGE = 4096
EPOCH = 1_000
BASE = 0x7F00_0000_0000
TRACKED = [(0, 64)]


def _regions(pages: list[tuple[int, int]]) -> np.ndarray:
    return np.array([(BASE + a * PAGE, BASE + b * PAGE) for a, b in pages], dtype=np.uint64).reshape(-1, 2)


def delta(
    seq: int, pages: list[tuple[int, int]], *, first_seq: int | None = None, resync: bool = False, epoch: int = EPOCH
) -> writewatch.Delta:
    return writewatch.Delta("s", epoch, seq, seq if first_seq is None else first_seq, resync, 0, _regions(pages))


def checker(**kwargs: object) -> StreamChecker:
    return StreamChecker("t", base_address=BASE, **kwargs)  # type: ignore[arg-type]


def test_a_good_trace_passes_and_covers_what_was_written() -> None:
    c = checker()
    c.feed(delta(1, TRACKED, resync=True))
    c.feed(delta(2, [(3, 4), (10, 12)]))
    c.feed(delta(5, [(20, 21)], first_seq=3))  # merged for a slow reader
    c.feed(delta(6, [(3, 4)]))
    c.check_covers({3, 10, 11, 20})
    assert c.cursor == (EPOCH, 6)
    assert (c.n_deltas, c.n_resyncs, c.n_merged) == (4, 1, 1)
    assert c.received_pages() == {3, 10, 11, 20}


def test_a_new_epoch_entered_with_a_resync_passes() -> None:
    c = checker()
    c.feed(delta(1, TRACKED, resync=True))
    c.feed(delta(2, [(1, 2)]))
    c.feed(delta(4, TRACKED, first_seq=1, resync=True, epoch=EPOCH + 1))
    c.feed(delta(5, [(2, 3)], epoch=EPOCH + 1))
    c.check_covers({1, 2, 7})  # 7 only in the RESYNCs: covered, not exact-checked


@pytest.mark.parametrize(
    ("trace", "message"),
    [
        ([delta(1, TRACKED, resync=True), delta(2, [(1, 2)]), delta(2, [(1, 2)])], "duplicate"),
        ([delta(1, TRACKED, resync=True), delta(3, [(1, 2)], first_seq=2), delta(4, [], first_seq=3)], "duplicate"),
        ([delta(1, TRACKED, resync=True), delta(3, [(1, 2)])], "missing"),
        ([delta(1, [(1, 2)])], "RESYNC"),
        ([delta(2, TRACKED, resync=True)], "seq 1"),
        ([delta(1, TRACKED, resync=True), delta(1, [(1, 2)], epoch=EPOCH + 1)], "RESYNC"),
        (
            [
                delta(1, TRACKED, resync=True),
                delta(1, TRACKED, resync=True, epoch=EPOCH + 1),
                delta(2, TRACKED, resync=True, epoch=EPOCH),
            ],
            "returned to an epoch",
        ),
        ([delta(1, TRACKED, resync=True), delta(2, [(1, 2)], first_seq=3)], "first_seq <= seq"),
        ([delta(1, TRACKED, resync=True), delta(2, [(5, 6), (1, 2)])], "unsorted or overlapping"),
        ([delta(1, TRACKED, resync=True), delta(2, [(1, 3), (2, 4)])], "unsorted or overlapping"),
        ([delta(1, TRACKED, resync=True), delta(2, [(1, 1)])], "empty or inverted"),
    ],
)
def test_bad_traces_fail(trace: list[writewatch.Delta], message: str) -> None:
    c = checker()
    with pytest.raises(StreamViolation, match=message):
        for d in trace:
            c.feed(d)


def test_unaligned_regions_fail() -> None:
    c = checker()
    bad = writewatch.Delta("s", EPOCH, 1, 1, True, 0, np.array([[BASE, BASE + 100]], dtype=np.uint64))
    with pytest.raises(StreamViolation, match="page aligned"):
        c.feed(bad)


def test_a_gap_closed_by_a_resync_passes() -> None:
    c = checker()
    c.feed(delta(1, TRACKED, resync=True))
    c.feed(delta(9, TRACKED, first_seq=5, resync=True))
    assert c.cursor == (EPOCH, 9)


def test_resume_continues_right_after_the_cursor() -> None:
    c = checker(resume=(EPOCH, 5))
    c.feed(delta(6, [(1, 2)]))
    for first_seq, message in [(5, "duplicate"), (7, "missing")]:
        c = checker(resume=(EPOCH, 5))
        with pytest.raises(StreamViolation, match=message):
            c.feed(delta(first_seq, [(1, 2)]))
    c = checker(resume=(EPOCH - 1, 5))  # the daemon restarted since: a new epoch, so a RESYNC
    with pytest.raises(StreamViolation, match="RESYNC"):
        c.feed(delta(6, [(1, 2)]))


def test_filter_gaps_pass_only_when_allowed() -> None:
    trace = [delta(1, TRACKED, resync=True), delta(4, [(1, 2)])]
    c = checker()
    with pytest.raises(StreamViolation, match="missing"):
        for d in trace:
            c.feed(d)
    c = checker(allow_filter_gaps=True)
    for d in trace:
        c.feed(d)


def test_missing_and_phantom_pages_fail() -> None:
    c = checker()
    c.feed(delta(1, [(0, 8)], resync=True))
    c.feed(delta(2, [(10, 11)]))
    with pytest.raises(StreamViolation, match="never received"):
        c.check_covers({10, 12})
    c.check_covers({5, 10})  # page 5: in the RESYNC
    with pytest.raises(StreamViolation, match="not written"):
        c.check_covers({5})
    c.check_covers({5}, exact=False)


def test_a_huge_resync_is_checked_without_listing_its_pages() -> None:
    c = StreamChecker("huge")
    c.feed(delta(1, [], resync=True))
    huge = writewatch.Delta("s", EPOCH, 2, 2, True, 0, np.array([[0, 1 << 46]], dtype=np.uint64))
    c.feed(huge)
    c.check_covers({0, 12345, (1 << 34) - 1})
    with pytest.raises(StreamViolation, match="never received"):
        c.check_covers({1 << 34})


@st.composite
def traces(draw: st.DrawFn) -> tuple[list[writewatch.Delta], set[int]]:
    """A valid trace as a hub would deliver it to a (sometimes slow) reader, and what was written."""
    n_harvests = draw(st.integers(1, 30))
    harvests = [sorted(draw(st.sets(st.integers(0, 63), min_size=1, max_size=6))) for _ in range(n_harvests)]
    out = [delta(1, TRACKED, resync=True)]
    seq = 1
    i = 0
    while i < n_harvests:
        n_merged = draw(st.integers(1, 4))
        pages = sorted({p for h in harvests[i : i + n_merged] for p in h})
        group = len(harvests[i : i + n_merged])
        out.append(delta(seq + group, _runs(pages), first_seq=seq + 1))
        seq += group
        i += n_merged
    return out, {p for h in harvests for p in h}


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for p in pages:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


@settings(max_examples=200, deadline=None)
@given(traces(), st.data())
def test_valid_traces_pass_and_any_single_corruption_fails(
    trace_and_written: tuple[list[writewatch.Delta], set[int]], data: st.DataObject
) -> None:
    trace, written = trace_and_written
    c = checker()
    for d in trace:
        c.feed(d)
    c.check_covers(written)

    corruption = data.draw(st.sampled_from(["drop", "repeat", "lose_page", "extra_page"]))
    bad = list(trace)
    written_bad = set(written)
    if corruption in ("drop", "repeat"):
        if len(bad) < 3 and corruption == "drop":
            return  # dropping the last delta of a trace leaves a valid (shorter) prefix
        index = (
            data.draw(st.integers(1, len(bad) - 2)) if corruption == "drop" else data.draw(st.integers(1, len(bad) - 1))
        )
        if corruption == "drop":
            del bad[index]
        else:
            bad.insert(index + 1, bad[index])
    elif corruption == "lose_page":
        page = data.draw(st.sampled_from(sorted(written)))
        written_bad.add(64 + page)  # written outside what any delta (even the RESYNC) reports
    else:
        written_bad.discard(data.draw(st.sampled_from(sorted(written))))
    c = checker()
    with pytest.raises(StreamViolation):
        for d in bad:
            c.feed(d)
        c.check_covers(written_bad)
