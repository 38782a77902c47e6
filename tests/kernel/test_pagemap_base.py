"""Port of the selftest's ``base_tests``, ``test_simple`` and ``hpage_unit_tests`` on every memory kind.

Each case compares the reported pages exactly with the pages the test wrote (whole huge
pages for hugetlb, where one store dirties the whole huge page).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from writewatchd.kernel import Category, ScanFlag

from .memhelpers import HPAGE_PMD_PAGES, KINDS, WRITTEN, MemFactory, Tracked, huge_pages, region_list

SIZES = {"anon": 10, "anon_large": 5120, "thp": HPAGE_PMD_PAGES}


def _n_pages(kind: str) -> int:
    return SIZES.get(kind, HPAGE_PMD_PAGES if kind.startswith("hugetlb") else 10)


@pytest.fixture(params=KINDS)
def tracked(request: pytest.FixtureRequest, make_mem: MemFactory, track: Callable[..., Tracked]) -> Tracked:
    kind = request.param
    return track(make_mem(kind, _n_pages(kind)))


def test_new_range_is_clean(tracked: Tracked) -> None:
    assert tracked.written() == set()
    assert tracked.harvest() == set()


def test_all_written_is_one_region(tracked: Tracked) -> None:
    tracked.mem.write_all()
    assert tracked.regions() == [(0, tracked.mem.n_pages)]


def test_rewrite_all_but_first_and_last(tracked: Tracked) -> None:
    mem = tracked.mem
    mem.write_all()
    assert tracked.harvest() == set(range(mem.n_pages))
    inner = range(1, mem.n_pages - 1)
    mem.write(inner)
    expected = mem.dirtied(inner)
    assert tracked.regions() == [(min(expected), max(expected) + 1)]


def test_after_wp_nothing_is_written(tracked: Tracked) -> None:
    tracked.mem.write_all()
    tracked.harvest()
    assert tracked.written() == set()
    assert tracked.harvest() == set()


def test_single_middle_page(tracked: Tracked) -> None:
    mem = tracked.mem
    middle = mem.n_pages // 2
    mem.write([middle])
    assert tracked.written() == mem.dirtied([middle])
    assert tracked.harvest() == mem.dirtied([middle])
    assert tracked.written() == set()


def test_two_middle_pages_scanned_alone(tracked: Tracked) -> None:
    mem = tracked.mem
    first = mem.n_pages // 2
    mem.write([first, first + 1])
    result = tracked.scanner.scan(
        mem.page(first), mem.page(first + 2), category_mask=WRITTEN, return_mask=WRITTEN | Category.HUGE
    )
    assert region_list(result.regions, mem.addr) == [(first, first + 2)]


def test_simple_protect_write_cycle(make_mem: MemFactory, track: Callable[..., Tracked]) -> None:
    tracked = track(make_mem("anon", 1))
    for _ in range(100):
        tracked.protect()
        assert tracked.written() == set()
        tracked.mem.write([0])
        assert tracked.written() == {0}


N_THPS = 10


@pytest.fixture
def thps(make_mem: MemFactory, track: Callable[..., Tracked]) -> Tracked:
    return track(make_mem("thp", N_THPS * HPAGE_PMD_PAGES))


class TestHugePageUnits:
    """``hpage_unit_tests``: protection of whole THPs, partial writes and max_pages halves."""

    def test_protection_keeps_thps_huge_and_clean(self, thps: Tracked) -> None:
        mem = thps.mem
        assert huge_pages(thps.scanner, mem.addr, mem.end) == mem.n_pages
        assert thps.written() == set()

    def test_written_thps_are_one_region(self, thps: Tracked) -> None:
        mem = thps.mem
        mem.write_all()
        result = thps.scanner.scan(mem.addr, mem.end, category_mask=WRITTEN, return_mask=WRITTEN)
        assert region_list(result.regions, mem.addr) == [(0, mem.n_pages)]
        assert [int(row[2]) for row in result.regions] == [WRITTEN]

    def test_middle_4k_write_in_a_thp(self, thps: Tracked) -> None:
        page = 3 * HPAGE_PMD_PAGES + HPAGE_PMD_PAGES // 2
        thps.mem.write([page])
        assert thps.written() == {page}

    def test_protect_first_half_reports_second(self, thps: Tracked) -> None:
        mem = thps.mem
        mem.write_all()
        half = mem.n_pages // 2
        thps.scanner.scan(mem.addr, mem.page(half), flags=ScanFlag.WP_MATCHING, category_mask=WRITTEN)
        assert thps.written() == set(range(half, mem.n_pages))

    def test_wp_with_max_pages_half(self, thps: Tracked) -> None:
        mem = thps.mem
        mem.write_all()
        half = mem.n_pages // 2
        result = thps.scanner.scan(
            mem.addr, mem.end, flags=ScanFlag.WP_MATCHING, category_mask=WRITTEN, return_mask=WRITTEN, max_pages=half
        )
        assert region_list(result.regions, mem.addr) == [(0, half)]
        assert not result.complete
        assert thps.written() == set(range(half, mem.n_pages))

    def test_get_half_huge_page(self, thps: Tracked) -> None:
        mem = thps.mem
        mem.write_all()
        half_thp = HPAGE_PMD_PAGES // 2
        first = thps.scanner.scan(
            mem.addr,
            mem.end,
            flags=ScanFlag.WP_MATCHING,
            category_mask=WRITTEN,
            return_mask=WRITTEN,
            max_pages=half_thp,
        )
        assert region_list(first.regions, mem.addr) == [(0, half_thp)]
        assert thps.harvest() == set(range(half_thp, mem.n_pages))
