"""Region summaries: the compiled pass against plain Python, the numpy fallback, the copy out of scan rows,
and the wire frames built from them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb
from writewatch.regions import decode_regions, encode_regions
from writewatchd.service import wire
from writewatchd.tracking import summary
from writewatchd.tracking.delta import Delta
from writewatchd.tracking.summary import RegionSummary, regions_of_scan, summarize

PAGE = 4096
# (gap, length) steps in pages: gap 0 makes a row touch the previous one; big gaps need wide pairs.
steps = st.lists(
    st.tuples(st.one_of(st.integers(0, 3), st.integers(0, 1 << 34)), st.integers(1, 1 << 20)), min_size=1, max_size=40
)
# First pages up to the top of the u64 address space that 40 maximal steps leave.
first_pages = st.one_of(st.integers(0, 1 << 30), st.integers(0, (1 << 52) - 40 * ((1 << 34) + (1 << 20))))


def _comparable(summary: RegionSummary) -> tuple[int, int, bytes | None]:
    """A summary with its pairs as bytes (``==`` on arrays compares elements)."""
    return summary.n_pages, summary.n_touching, None if summary.pairs is None else summary.pairs.tobytes()


def _regions(first_page: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    rows, end = [], first_page
    for gap, length in pairs:
        rows.append(((end + gap) * PAGE, (end + gap + length) * PAGE))
        end += gap + length
    return np.array(rows, dtype=np.uint64)


def _expected(regions: np.ndarray, base: int) -> RegionSummary:
    """By definition, one row at a time."""
    values, previous, touching = [], base, 0
    for i, (start, end) in enumerate(regions.tolist()):
        touching += i > 0 and start == previous
        values += [(start - previous) // PAGE, (end - start) // PAGE]
        previous = end
    pairs = np.array(values, dtype="<u4").data if max(values) <= 0xFFFF_FFFF else None
    return RegionSummary(sum(values[1::2]), touching, pairs)


def test_the_compiled_pass_is_built_here() -> None:
    # The suite runs where cc exists (.ci/run installs it): the fast path must really be tested.
    assert summary._compiled() is not None


@given(first_page=first_pages, pairs=steps)
def test_compiled_pass_matches_the_definition(first_page: int, pairs: list[tuple[int, int]]) -> None:
    regions = _regions(first_page, pairs)
    expected = _comparable(_expected(regions, int(regions[0, 0])))
    assert _comparable(summarize(regions, pairs=True)) == expected
    assert _comparable(summarize(regions)) == (*expected[:2], None)
    base = max(0, int(regions[0, 0]) - 5 * PAGE)
    assert _comparable(summarize(regions, base_address=base, pairs=True)) == _comparable(_expected(regions, base))


def _scan_rows(regions: np.ndarray, capacity: int) -> np.ndarray:
    """A scanner's buffer holding ``regions`` as PAGEMAP_SCAN rows (categories set), then stale rows."""
    rows = np.full((capacity, 3), 0xDEAD_B000, dtype=np.uint64)
    rows[: len(regions), :2] = regions
    rows[: len(regions), 2] = 2  # PAGE_IS_WRITTEN
    return rows


@given(first_page=first_pages, pairs=steps, spare_rows=st.integers(0, 3))
def test_regions_of_scan_copies_and_remembers_the_summary(
    first_page: int, pairs: list[tuple[int, int]], spare_rows: int
) -> None:
    regions = _regions(first_page, pairs)
    copied = regions_of_scan(_scan_rows(regions, len(regions) + spare_rows), len(regions))
    assert copied is not None
    assert copied.dtype == np.uint64 and copied.flags.c_contiguous
    np.testing.assert_array_equal(copied, regions)
    # A full buffer is only copied (the scanner joins it with what follows); else the summary is remembered.
    assert (summary._remembered.regions is copied) == (spare_rows > 0) == (not copied.flags.writeable)
    expected = _comparable(_expected(regions, int(regions[0, 0])))
    # Remembered: the same answers as a pass over the array would give.
    assert _comparable(summarize(copied, pairs=True)) == expected
    assert _comparable(summarize(copied)) == (*expected[:2], None)
    base = max(0, int(regions[0, 0]) - 5 * PAGE)
    assert _comparable(summarize(copied, base_address=base, pairs=True)) == _comparable(_expected(regions, base))
    # An equal array that is not the copy gets its own pass, with the same result.
    assert _comparable(summarize(regions.copy(), pairs=True)) == expected


@pytest.mark.parametrize(
    "rows",
    [
        [],
        [[0x1000, 0x2000]],
        [[0, 1 << 47]],  # 100 % of a big range: one region
        [[0x1000, 0x2000], [0x2000, 0x5000]],  # touching rows, as a full bounce buffer leaves them
        [[0x1000, 0x2000], [0xFFFF_F000_0000_0000, 0xFFFF_FFFF_FFFF_F000]],  # u64 span: wide pairs
    ],
)
def test_regions_of_scan_edge_cases(rows: list[list[int]]) -> None:
    regions = np.array(rows, dtype=np.uint64).reshape(-1, 2)
    copied = regions_of_scan(_scan_rows(regions, 4), len(regions))
    assert copied is not None
    np.testing.assert_array_equal(copied, regions)
    assert copied.shape == (len(regions), 2)
    if len(regions):
        assert _comparable(summarize(copied, pairs=True)) == _comparable(_expected(regions, int(regions[0, 0])))


def test_remember_keeps_the_summary_of_a_read_only_array() -> None:
    regions = _regions(7, [(1, 2), (0, 3), (5, 1)])
    remembered = summarize(regions, remember=True)
    assert not regions.flags.writeable and summary._remembered.regions is regions
    assert _comparable(remembered) == _comparable(_expected(regions, int(regions[0, 0])))
    assert summarize(regions, pairs=True) is remembered
    assert summarize(regions).pairs is None


def test_regions_of_scan_refuses_rows_the_codec_refuses() -> None:
    with pytest.raises(ValueError, match="sorted and non-overlapping"):
        regions_of_scan(_scan_rows(np.array([[0x3000, 0x4000], [0x1000, 0x2000]], dtype=np.uint64), 2), 2)


@given(first_page=st.integers(0, 1 << 30), pairs=steps)
def test_numpy_fallback_counts_the_same(first_page: int, pairs: list[tuple[int, int]]) -> None:
    regions = _regions(first_page, pairs)
    compiled = _comparable(summarize(regions))
    assert _comparable(summary._summarize_numpy(regions)) == compiled
    # Arrays the compiled pass cannot read take the fallback: a strided view, another dtype.
    assert _comparable(summarize(np.column_stack((regions, regions[:, :1]))[:, :2])) == compiled
    assert _comparable(summarize(regions.astype(np.int64))) == compiled


@pytest.mark.parametrize(
    ("rows", "base", "match"),
    [
        ([[0x1000, 0x1800]], None, "multiples of the page size"),
        ([[0x2000, 0x2000]], None, "start < end"),
        ([[0x1000, 0x3000], [0x2000, 0x4000]], None, "sorted and non-overlapping"),
        ([[0x1000, 0x3000]], 0x2000, "base_address"),
    ],
)
def test_compiled_pass_refuses_what_the_codec_refuses(rows: list[list[int]], base: int | None, match: str) -> None:
    regions = np.array(rows, dtype=np.uint64)
    with pytest.raises(ValueError, match=match):
        summarize(regions, base_address=base, pairs=True)
    with pytest.raises(ValueError, match=match):
        encode_regions(regions, base_address=base)


def test_empty_regions() -> None:
    assert summarize(np.empty((0, 2), dtype=np.uint64), pairs=True) == RegionSummary(0, 0, None)


def _without_compiler(function: object) -> object:
    original = summary._compiled
    summary._compiled = lambda: None  # type: ignore[assignment]
    try:
        return function()  # type: ignore[operator]
    finally:
        summary._compiled = original


def _canonical(session_id: str, delta: Delta, chunk: np.ndarray, index: int, count: int) -> pb.SubscribeResponse:
    """The frame's message built field by field, the pairs inside (what a client must parse)."""
    message = pb.SubscribeResponse()
    fields = message.delta
    fields.session_id, fields.epoch, fields.seq, fields.first_seq = session_id, delta.epoch, delta.seq, delta.first_seq
    fields.resync, fields.harvested_at_unix_ns = delta.resync, delta.harvested_at_unix_ns
    fields.regions.CopyFrom(encode_regions(chunk, page_size_bytes=PAGE))
    fields.fragment_index, fields.n_fragments = index, count
    fields.n_regions, fields.n_pages = len(delta.regions), delta.n_pages
    if delta.covered is not None and index == 0:
        fields.partial = True
        fields.covered.CopyFrom(encode_regions(delta.covered, page_size_bytes=PAGE))
    return message


@given(
    first_page=first_pages,
    pairs=steps,
    max_bytes=st.sampled_from([16, 64, 1 << 20]),
    covered=st.booleans(),
    from_scan=st.booleans(),
)
def test_frames_are_the_same_bytes_with_or_without_the_compiled_pass(
    first_page: int, pairs: list[tuple[int, int]], max_bytes: int, covered: bool, from_scan: bool
) -> None:
    regions = _regions(first_page, [(max(gap, 1), length) for gap, length in pairs])  # a delta is merged
    if from_scan:  # as a tracker's harvest makes them: the summary is remembered
        copied = regions_of_scan(_scan_rows(regions, len(regions) + 1), len(regions))
        assert copied is not None
        regions = copied
    delta = Delta(3, 9, 8, False, 123, regions, regions[:1].copy() if covered else None)
    fast = wire.delta_frames("s-1", delta, max_bytes)
    slow = _without_compiler(lambda: wire.delta_frames("s-1", delta, max_bytes))
    assert fast == slow
    # Each frame parses as the message with the pairs inside, and decodes to its fragment.
    decoded = []
    for index, frame in enumerate(fast):
        message = pb.SubscribeResponse.FromString(frame)
        chunk = decode_regions(message.delta.regions)
        assert message == _canonical("s-1", delta, chunk, index, len(fast))
        decoded.append(chunk)
    np.testing.assert_array_equal(np.concatenate(decoded), regions)


@pytest.mark.parametrize("n_regions", [0, 1, 100])
def test_frames_of_a_resync_or_a_single_region(n_regions: int) -> None:
    regions = np.array([[(3 * i + 1) * PAGE, (3 * i + 2) * PAGE] for i in range(n_regions)], dtype=np.uint64)
    delta = Delta(1, 1, 1, n_regions == 0, 5, regions.reshape(-1, 2))
    frames = wire.delta_frames("s-2", delta, 1 << 20)
    assert frames == _without_compiler(lambda: wire.delta_frames("s-2", delta, 1 << 20))
    assert len(frames) == 1
    message = pb.SubscribeResponse.FromString(frames[0])
    assert message == _canonical("s-2", delta, delta.regions, 0, 1)
