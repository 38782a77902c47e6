"""The interval arithmetic under report and heatmap, against brute force over page sets."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from writewatch.analysis import coverage, merge_ranges
from writewatch.heatmap import Layout, _spread

rows = st.lists(st.tuples(st.integers(0, 200), st.integers(1, 40)), max_size=30).map(
    lambda pairs: np.array([(s, s + n) for s, n in pairs], dtype=np.int64).reshape(-1, 2)
)


def _pages(ranges: np.ndarray) -> set[int]:
    return {p for s, e in ranges.tolist() for p in range(s, e)}


@given(rows, st.booleans())
def test_merge_is_the_union(ranges: np.ndarray, join_touching: bool) -> None:
    merged = merge_ranges(ranges, join_touching=join_touching)
    assert _pages(merged) == _pages(ranges)
    assert (merged[:, 0] < merged[:, 1]).all()
    gaps = merged[1:, 0] - merged[:-1, 1]
    assert (gaps > 0).all() if join_touching else (gaps >= 0).all()


@given(rows, st.lists(st.integers(0, 260), min_size=2, max_size=12).map(sorted))
def test_coverage_counts_every_region_page_per_bin(regions: np.ndarray, edges: list[int]) -> None:
    counts = coverage(regions, np.array(edges, dtype=np.int64))
    pairs = regions.tolist()
    expected = [sum(max(0, min(e, hi) - max(s, lo)) for s, e in pairs) for lo, hi in itertools.pairwise(edges)]
    assert counts.tolist() == expected


def test_layout_removes_holes_and_maps_back() -> None:
    layout = Layout.of(np.array([[10, 20], [100, 105], [1000, 1001]], dtype=np.int64), 4096)
    assert layout.n_pages == 16
    assert layout.position(np.array([10, 19, 100, 104, 1000])).tolist() == [0, 9, 10, 14, 15]
    assert [layout.address(p) for p in (0, 9, 10, 15, 16)] == [
        10 * 4096,
        19 * 4096,
        100 * 4096,
        1000 * 4096,
        1001 * 4096,
    ]


def test_labels_spread_apart_and_stay_inside() -> None:
    assert _spread([5.0, 6.0, 7.0], 10.0, 100.0) == [5.0, 15.0, 25.0]
    assert _spread([90.0, 95.0, 99.0], 10.0, 100.0) == [80.0, 90.0, 100.0]
