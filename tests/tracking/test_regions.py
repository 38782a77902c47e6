"""RegionSet against a plain Python set of pages."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from writewatchd.tracking.regions import RegionSet, as_regions, merge, n_bytes, n_pages, page_addresses
from writewatchd.tracking.tracker import _union

PAGE = 4096
spans = st.lists(st.tuples(st.integers(0, 200), st.integers(1, 20)), max_size=25)


def _array(pairs: list[tuple[int, int]]) -> np.ndarray:
    return as_regions([(s * PAGE, (s + n) * PAGE) for s, n in pairs])


def _pages(pairs: list[tuple[int, int]]) -> set[int]:
    return {p for s, n in pairs for p in range(s, s + n)}


def _set_pages(regions: np.ndarray) -> set[int]:
    return {p for s, e in regions.tolist() for p in range(s // PAGE, e // PAGE)}


def _is_canonical(regions: np.ndarray) -> bool:
    return bool(np.all(regions[:, 1] > regions[:, 0]) and np.all(regions[1:, 0] > regions[:-1, 1]))


@given(spans)
def test_merge_is_sorted_disjoint_and_exact(pairs: list[tuple[int, int]]) -> None:
    merged = merge(_array(pairs))
    assert _is_canonical(merged)
    assert _set_pages(merged) == _pages(pairs)


@given(spans, spans, spans)
def test_set_operations_match_python_sets(
    a: list[tuple[int, int]], b: list[tuple[int, int]], c: list[tuple[int, int]]
) -> None:
    rs = RegionSet(_array(a))
    rs.add(_array(b))
    assert _set_pages(rs.regions) == _pages(a) | _pages(b)
    assert _set_pages(rs.intersection(_array(c))) == (_pages(a) | _pages(b)) & _pages(c)
    rs.discard(_array(c))
    assert _is_canonical(rs.regions) or len(rs) == 0
    assert _set_pages(rs.regions) == (_pages(a) | _pages(b)) - _pages(c)


@given(spans, st.integers(0, 220), st.integers(0, 40))
def test_clip(pairs: list[tuple[int, int]], start: int, n_pages: int) -> None:
    rs = RegionSet(_array(pairs))
    clipped = rs.clip(start * PAGE, (start + n_pages) * PAGE)
    assert _set_pages(clipped) == _pages(pairs) & set(range(start, start + n_pages))


@given(spans)
def test_page_addresses_enumerates_every_page(pairs: list[tuple[int, int]]) -> None:
    merged = merge(_array(pairs))
    assert page_addresses(merged, PAGE).tolist() == sorted(p * PAGE for p in _pages(pairs))


def test_touching_regions_merge() -> None:
    assert merge(as_regions([(0, PAGE), (PAGE, 2 * PAGE)])).tolist() == [[0, 2 * PAGE]]


@given(spans, st.integers(0, (1 << 52) - 256))
def test_page_count_matches_python_sets_even_at_high_addresses(pairs: list[tuple[int, int]], offset_pages: int) -> None:
    merged = merge(_array(pairs)) + np.uint64(offset_pages * PAGE)  # sums of starts and ends wrap around 2**64
    assert n_pages(merged) == len(_pages(pairs))
    assert n_bytes(merged) == len(_pages(pairs)) * PAGE


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4)), max_size=30))
def test_union_of_one_scan_chunk_merges_rows_that_touch(steps: list[tuple[int, int]]) -> None:
    # A scan chunk is sorted and disjoint, but rows may touch where the kernel's bounce buffer filled up.
    rows, end = [], 0
    for gap, length in steps:
        rows.append((end + gap, end + gap + length))
        end += gap + length
    chunk = _array([(s, e - s) for s, e in rows])
    union = _union([chunk])
    assert _is_canonical(union) or len(union) == 0
    assert _set_pages(union) == _set_pages(chunk)
    if all(gap > 0 for gap, _ in steps[1:]):
        assert union is chunk  # nothing touches: no merge pass
