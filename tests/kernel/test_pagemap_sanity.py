"""Port of the selftest's ``sanity_tests_sd``: argument checks, page counts and ``walk_end`` values.

1000 anonymous pages, registered and write-protected; every case states the exact pages.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import ClassVar

import pytest

from writewatchd import FeatureUnavailable, UsageError
from writewatchd.kernel import ALL_CATEGORIES, PAGE_SIZE, Category, PagemapScanner, ScanFlag

from .memhelpers import WP_SCAN, WRITTEN, MemFactory, Tracked, page_set, raw_pagemap_scan, region_list

N_PAGES = 1000
EVEN = set(range(0, N_PAGES, 2))
PRESENT = int(Category.PRESENT)
#: Inverting every bit but WRITTEN and PRESENT makes "mask = all" match written present anon pages.
NOT_WP = int(ALL_CATEGORIES & ~(Category.WRITTEN | Category.PRESENT))


@pytest.fixture
def sd(make_mem: MemFactory, track: Callable[..., Tracked]) -> Tracked:
    return track(make_mem("anon", N_PAGES))


def _regions(tracked: Tracked, start_page: int = 0, **kwargs: int) -> tuple[list[tuple[int, int]], int]:
    """One raw ioctl from ``start_page``; returns the regions and walk_end, as page indices."""
    mem = tracked.mem
    kwargs.setdefault("category_mask", WRITTEN)
    kwargs.setdefault("return_mask", WRITTEN)
    raw = tracked.scanner.ioctl(mem.page(start_page), mem.end, **kwargs)
    regions = region_list(tracked.scanner.buffer[: raw.n_regions], mem.addr)
    return regions, (raw.walk_end - mem.addr) // PAGE_SIZE


def _pages(runs: list[tuple[int, int]]) -> set[int]:
    return {page for first, end in runs for page in range(first, end)}


class TestArguments:
    def test_zero_length_range_returns_nothing(self, sd: Tracked) -> None:
        raw = sd.scanner.ioctl(sd.mem.addr, sd.mem.addr, category_mask=WRITTEN)
        assert (raw.n_regions, raw.walk_end) == (0, sd.mem.addr)

    def test_null_vec_with_length_is_einval(self, sd: Tracked) -> None:
        result, _ = raw_pagemap_scan(sd.scanner.fileno(), start=sd.mem.addr, end=sd.mem.end, vec=0, vec_len=10)
        assert result == -22

    @pytest.mark.parametrize("with_pointer", [False, True], ids=["no-vec", "vec-ignored"])
    def test_vec_len_zero_returns_zero(self, sd: Tracked, with_pointer: bool) -> None:
        sd.mem.write_all()
        vec = sd.scanner.buffer.ctypes.data if with_pointer else 0
        result, arg = raw_pagemap_scan(
            sd.scanner.fileno(),
            start=sd.mem.addr,
            end=sd.mem.end,
            vec=vec,
            vec_len=0,
            category_mask=WRITTEN,
            return_mask=WRITTEN,
        )
        assert (result, arg.walk_end) == (0, sd.mem.end)

    @pytest.mark.parametrize("flags", [(1 << 64) - 1, int(WP_SCAN) | 0xFF], ids=["all-ones", "wp-0xff"])
    def test_unknown_flags_are_usage_errors(self, sd: Tracked, flags: int) -> None:
        with pytest.raises(UsageError):
            sd.scanner.ioctl(sd.mem.addr, sd.mem.end, flags=flags)

    def test_no_selection_mask_matches_every_page(self, sd: Tracked) -> None:
        result = sd.scanner.scan(sd.mem.addr, sd.mem.end, return_mask=WRITTEN)
        assert region_list(result.regions, sd.mem.addr) == [(0, N_PAGES)]
        assert result.regions[:, 2].tolist() == [0]

    def test_clean_range_with_return_mask_zero(self, sd: Tracked) -> None:
        result = sd.scanner.scan(sd.mem.addr, sd.mem.end, category_mask=WRITTEN, category_anyof_mask=WRITTEN)
        assert result.regions.shape == (0, 3)

    @pytest.mark.parametrize(
        ("field", "value"),
        [("return_mask", 0x1000), ("category_mask", 0xFFF), ("category_anyof_mask", 1 << 12)],
    )
    def test_unknown_category_bits(self, sd: Tracked, field: str, value: int) -> None:
        with pytest.raises(UsageError):
            sd.scanner.scan(sd.mem.addr, sd.mem.end, **{field: value})
        with pytest.raises(FeatureUnavailable):
            sd.scanner.ioctl(sd.mem.addr, sd.mem.end, flags=WP_SCAN, **{field: value})

    def test_inverted_all_with_wp_matches_everything_and_keeps_clean(self, sd: Tracked) -> None:
        result = sd.scanner.scan(sd.mem.addr, sd.mem.end, flags=WP_SCAN, category_inverted=ALL_CATEGORIES)
        assert region_list(result.regions, sd.mem.addr) == [(0, N_PAGES)]
        assert sd.written() == set()

    def test_clearing_a_clean_range_with_a_large_vec(self, sd: Tracked) -> None:
        assert sd.harvest() == set()


class TestCounts:
    def test_every_other_page_gives_500_regions(self, sd: Tracked) -> None:
        sd.mem.write(EVEN)
        regions, _ = _regions(sd)
        assert regions == [(p, p + 1) for p in sorted(EVEN)]

    def test_in_parts_max_pages_then_small_vec_then_rest(self, sd: Tracked) -> None:
        sd.mem.write(EVEN)
        first, _ = _regions(sd, flags=ScanFlag.WP_MATCHING, max_pages=498)
        assert first == [(p, p + 1) for p in range(0, 996, 2)]
        second, _ = _regions(sd, vec_len=2)
        assert second == [(996, 997), (998, 999)]
        assert sd.harvest() == {996, 998}
        assert len(first) + len(second) == 500

    def test_exact_max_pages_then_one_remaining(self, sd: Tracked) -> None:
        sd.mem.write(EVEN | {1})
        first, _ = _regions(sd, flags=ScanFlag.WP_MATCHING, max_pages=500)
        assert _pages(first) == (EVEN | {1}) - {998}
        assert sd.harvest() == {998}

    def test_protecting_two_pages_leaves_the_rest(self, sd: Tracked) -> None:
        sd.mem.write_all()
        sd.scanner.scan(sd.mem.page(1), sd.mem.page(3), flags=ScanFlag.WP_MATCHING, category_mask=WRITTEN)
        assert sd.regions() == [(0, 1), (3, N_PAGES)]

    def test_two_mappings_second_reported_whole(
        self, sd: Tracked, make_mem: MemFactory, track: Callable[..., Tracked]
    ) -> None:
        other = track(make_mem("anon", N_PAGES))
        sd.mem.write_all()
        other.mem.write_all()
        assert sd.harvest() == set(range(N_PAGES))
        assert other.regions() == [(0, N_PAGES)]

    def test_three_max_pages_scans_sum_to_all(self, sd: Tracked) -> None:
        sd.mem.write_all()
        seen: list[tuple[int, int]] = []
        for _ in range(3):
            regions, _ = _regions(sd, flags=ScanFlag.WP_MATCHING, max_pages=400)
            seen += regions
        assert seen == [(0, 400), (400, 800), (800, 1000)]
        assert sd.written() == set()

    def test_small_vec_resume_loop_finds_every_random_write(
        self, make_mem: MemFactory, track: Callable[..., Tracked]
    ) -> None:
        tracked = track(make_mem("anon", 10_000))
        mem = tracked.mem
        rng = random.Random(1234)
        for _ in range(10):
            pages = set(rng.sample(range(mem.n_pages), 300))
            mem.write(pages)
            found: set[int] = set()
            walk_end = 0
            while walk_end < mem.n_pages:
                regions, walk_end = _regions(tracked, walk_end, flags=WP_SCAN, vec_len=50)
                found |= _pages(regions)
            assert found == pages


WALK_END_CASES = [
    # (name, pages written, ioctl keywords, expected regions, expected walk_end page)
    ("big-vec-dense", "all", {}, [(0, N_PAGES)], N_PAGES),
    ("vec1-dense", "all", {"vec_len": 1}, [(0, N_PAGES)], N_PAGES),
    ("max-half-dense", "all", {"max_pages": 500}, [(0, 500)], 500),
    ("max-1-dense", "all", {"max_pages": 1}, [(0, 1)], 1),
    ("max-minus-1-dense", "all", {"max_pages": (1 << 64) - 1}, [(0, N_PAGES)], N_PAGES),
    ("clean", "none", {}, [], N_PAGES),
    ("vec1-sparse", "even", {"vec_len": 1}, [(0, 1)], 2),
    ("vec2-sparse", "even", {"vec_len": 2}, [(0, 1), (2, 3)], 4),
    # The cap is met exactly at a region end: the walk goes on to the next match.
    ("max-1-sparse", "even", {"max_pages": 1}, [(0, 1)], 2),
    ("max-2-sparse", "even", {"max_pages": 2}, [(0, 1), (2, 3)], 4),
    ("big-vec-sparse", "even", {}, [(p, p + 1) for p in sorted(EVEN)], N_PAGES),
]


@pytest.mark.parametrize(
    ("written", "kwargs", "expected", "walk_end"), [c[1:] for c in WALK_END_CASES], ids=[c[0] for c in WALK_END_CASES]
)
def test_walk_end(
    sd: Tracked, written: str, kwargs: dict[str, int], expected: list[tuple[int, int]], walk_end: int
) -> None:
    if written == "all":
        sd.mem.write_all()
    elif written == "even":
        sd.mem.write(EVEN)
    regions, got_walk_end = _regions(sd, **kwargs)
    assert (regions, got_walk_end) == (expected, walk_end)


def test_walk_end_of_zero_length_is_end(sd: Tracked) -> None:
    middle = sd.mem.page(N_PAGES // 2)
    raw = sd.scanner.ioctl(middle, middle, category_mask=WRITTEN)
    assert raw.walk_end == middle


class TestMaskCombinations:
    """``sanity_tests``: how category_mask, anyof, inverted and return_mask combine (unregistered memory)."""

    CASES: ClassVar[list[tuple[str, dict[str, int], int | None]]] = [
        ("anyof-all", {"category_anyof_mask": ALL_CATEGORIES, "return_mask": ALL_CATEGORIES}, WRITTEN | PRESENT),
        (
            "mask-all-inverted-rest",
            {"category_mask": ALL_CATEGORIES, "category_inverted": NOT_WP, "return_mask": ALL_CATEGORIES},
            WRITTEN | PRESENT,
        ),
        ("mask-w-anyof-present", {"category_mask": WRITTEN, "category_anyof_mask": PRESENT}, 0),
        ("anyof-all-return-w", {"category_anyof_mask": ALL_CATEGORIES, "return_mask": WRITTEN}, WRITTEN),
        ("not-file", {"category_mask": Category.FILE, "category_inverted": Category.FILE}, 0),
        ("not-written", {"category_mask": WRITTEN, "category_inverted": WRITTEN}, None),
        ("not-present", {"category_mask": PRESENT, "category_inverted": PRESENT}, None),
        # WP_MATCHING without CHECK_WPASYNC skips memory that is not registered.
        ("wp-all-masks", {"category_anyof_mask": ALL_CATEGORIES, "flags": ScanFlag.WP_MATCHING}, None),
    ]

    @pytest.mark.parametrize(("masks", "categories"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
    def test_written_anon(
        self, make_mem: MemFactory, scanner: PagemapScanner, masks: dict[str, int], categories: int | None
    ) -> None:
        mem = make_mem("anon", 20)
        mem.write_all()
        result = scanner.scan(mem.addr, mem.end, **masks)
        if categories is None:
            assert result.regions.shape[0] == 0
            return
        assert region_list(result.regions, mem.addr) == [(0, mem.n_pages)]
        assert result.regions[:, 2].tolist() == [categories]

    def test_read_only_file_mapping_is_file(self, make_mem: MemFactory, scanner: PagemapScanner) -> None:
        mem = make_mem("file_private", 16)
        mem.read_all()
        result = scanner.scan(mem.addr, mem.end, category_mask=Category.FILE | PRESENT, return_mask=ALL_CATEGORIES)
        assert region_list(result.regions, mem.addr) == [(0, 16)]
        assert result.regions[:, 2].tolist() == [Category.FILE | PRESENT | WRITTEN]

    def test_private_file_write_becomes_anonymous(self, make_mem: MemFactory, scanner: PagemapScanner) -> None:
        mem = make_mem("file_private", 16)
        mem.read_all()
        mem.write([5])
        result = scanner.scan(mem.addr, mem.end, category_mask=Category.FILE)
        assert page_set(result.regions, mem.addr) == set(range(16)) - {5}
