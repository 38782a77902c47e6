"""Region summaries: the compiled pass against plain Python, the numpy fallback, and the wire frames built from it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from writewatch.regions import encode_regions
from writewatchd.service import wire
from writewatchd.tracking import summary
from writewatchd.tracking.delta import Delta
from writewatchd.tracking.summary import RegionSummary, summarize

PAGE = 4096
# (gap, length) steps in pages: gap 0 makes a row touch the previous one; big gaps need wide pairs.
steps = st.lists(
    st.tuples(st.one_of(st.integers(0, 3), st.integers(0, 1 << 34)), st.integers(1, 1 << 20)), min_size=1, max_size=40
)


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
    pairs = np.array(values, dtype="<u4").tobytes() if max(values) <= 0xFFFF_FFFF else None
    return RegionSummary(sum(values[1::2]), touching, pairs)


def test_the_compiled_pass_is_built_here() -> None:
    # The suite runs where cc exists (.ci/run installs it): the fast path must really be tested.
    assert summary._summarize_function() is not None


@given(first_page=st.integers(0, 1 << 30), pairs=steps)
def test_compiled_pass_matches_the_definition(first_page: int, pairs: list[tuple[int, int]]) -> None:
    regions = _regions(first_page, pairs)
    assert summarize(regions, pairs=True) == _expected(regions, int(regions[0, 0]))
    assert summarize(regions) == _expected(regions, int(regions[0, 0]))._replace(pairs=None)
    base = max(0, int(regions[0, 0]) - 5 * PAGE)
    assert summarize(regions, base_address=base, pairs=True) == _expected(regions, base)


@given(first_page=st.integers(0, 1 << 30), pairs=steps)
def test_numpy_fallback_counts_the_same(first_page: int, pairs: list[tuple[int, int]]) -> None:
    regions = _regions(first_page, pairs)
    compiled = summarize(regions)
    assert summary._summarize_numpy(regions) == compiled
    # Arrays the compiled pass cannot read take the fallback: a strided view, another dtype.
    assert summarize(np.column_stack((regions, regions[:, :1]))[:, :2]) == compiled
    assert summarize(regions.astype(np.int64)) == compiled


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


@given(first_page=st.integers(0, 1 << 30), pairs=steps, max_bytes=st.sampled_from([16, 64, 1 << 20]))
def test_frames_are_the_same_bytes_with_or_without_the_compiled_pass(
    first_page: int, pairs: list[tuple[int, int]], max_bytes: int
) -> None:
    regions = _regions(first_page, [(max(gap, 1), length) for gap, length in pairs])  # a delta is merged
    delta = Delta(3, 9, 8, False, 123, regions)
    fast = wire.delta_frames("s-1", delta, max_bytes)
    original = summary._summarize_function
    summary._summarize_function = lambda: None  # type: ignore[assignment]
    try:
        slow = wire.delta_frames("s-1", delta, max_bytes)
    finally:
        summary._summarize_function = original
    assert fast == slow
