"""Memory states: zero page, DONTNEED'd pages and THP holes, mprotect, PROT_NONE, unmapped, guard pages.

Ports ``zeropfn_tests``, ``unpopulated_scan_test``, ``unpopulated_thp_hole_test``,
``mprotect_tests``, ``userfaultfd_tests`` and ``unmapped_region_tests``, plus exact categories.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
from collections.abc import Callable
from pathlib import Path

import pytest

from writewatchd import NotRegistered
from writewatchd.kernel import ALL_CATEGORIES, PAGE_SIZE, Category, PagemapScanner
from writewatchd.kernel.probe import Capabilities

from .memhelpers import (
    HPAGE_PMD_BYTES,
    HPAGE_PMD_PAGES,
    MADV_DONTNEED,
    MAP_FIXED,
    PROT_NONE,
    WP_SCAN,
    WRITTEN,
    Mem,
    MemFactory,
    Tracked,
    libc,
    madvise,
    map_thp_area,
    mprotect,
    munmap,
    page_set,
    raw_mmap,
    region_list,
)

MADV_GUARD_INSTALL = 102
RW = mmap.PROT_READ | mmap.PROT_WRITE
C = Category


def _categories(scanner: PagemapScanner, mem: Mem) -> list[tuple[int, int, int]]:
    """Every page's true categories, as ``(first_page, end_page, categories)`` runs."""
    result = scanner.scan(mem.addr, mem.end, return_mask=ALL_CATEGORIES)
    return [
        (a, b, int(row[2])) for (a, b), row in zip(region_list(result.regions, mem.addr), result.regions, strict=True)
    ]


class TestZeroPage:
    def test_read_faulted_anon_is_pfnzero(self, make_mem: MemFactory, scanner: PagemapScanner) -> None:
        mem = make_mem("anon", 16)
        mem.read_all()
        result = scanner.scan(mem.addr, mem.end, category_mask=C.PFNZERO)
        assert page_set(result.regions, mem.addr) == set(range(16))

    def test_write_replaces_the_zero_page(self, make_mem: MemFactory, scanner: PagemapScanner) -> None:
        mem = make_mem("anon", 16)
        mem.read_all()
        mem.write([4])
        result = scanner.scan(mem.addr, mem.end, category_mask=C.PFNZERO)
        assert page_set(result.regions, mem.addr) == set(range(16)) - {4}

    def test_thp_read_fault_maps_the_huge_zero_page(self, scanner: PagemapScanner) -> None:
        if Path("/sys/kernel/mm/transparent_hugepage/use_zero_page").read_text().strip() != "1":
            pytest.skip("the huge zero page is disabled (use_zero_page=0)")
        addr, unmap = map_thp_area(HPAGE_PMD_BYTES)
        try:
            ctypes.c_ubyte.from_address(addr).value  # noqa: B018  (a read fault)
            mem = Mem("thp", addr, HPAGE_PMD_BYTES)
            if _categories(scanner, mem)[0][2] & C.HUGE == 0:
                pytest.skip("the read fault did not map a huge zero PMD")
            assert _categories(scanner, mem) == [(0, HPAGE_PMD_PAGES, C.WRITTEN | C.PRESENT | C.PFNZERO | C.HUGE)]
        finally:
            unmap()


class TestUnpopulated:
    """The 2026 fixes (docs/kernel.md §5.3): pages whose content was dropped must read WRITTEN, on both scan paths."""

    @pytest.fixture
    def dropped(self, make_mem: MemFactory, track: Callable[..., Tracked]) -> Tracked:
        tracked = track(make_mem("anon", 64))
        tracked.mem.write_all()
        tracked.protect()
        madvise(tracked.mem.addr, tracked.mem.length_bytes, MADV_DONTNEED)
        return tracked

    @pytest.mark.parametrize(
        "masks",
        [
            {},
            {"category_mask": 0, "category_anyof_mask": WRITTEN},
            {"category_mask": WRITTEN, "return_mask": WRITTEN | C.PRESENT},
            {"category_mask": WRITTEN | C.WPALLOWED},
        ],
        ids=["fast-path", "anyof", "extra-return-bit", "extra-mask-bit"],
    )
    def test_dontneed_reads_written(self, dropped: Tracked, masks: dict[str, int], kernel_caps: Capabilities) -> None:
        """The fast path reads WRITTEN on every kernel; richer masks only once fixed (as probed)."""
        everywhere = not masks
        expected = set(range(64)) if everywhere or kernel_caps.fix_unpopulated_written else set()
        assert dropped.written(**masks) == expected

    def test_generic_wp_scan_rearms_dropped_pages(self, dropped: Tracked, kernel_caps: Capabilities) -> None:
        if not kernel_caps.fix_unpopulated_written:
            pytest.skip("unfixed kernel (probed): the generic path neither reports nor re-arms dropped pages")
        mem = dropped.mem
        result = dropped.scanner.scan(mem.addr, mem.end, flags=WP_SCAN, category_anyof_mask=WRITTEN)
        assert page_set(result.regions, mem.addr) == set(range(64))
        assert dropped.written() == set()
        mem.write([7])
        assert dropped.harvest() == {7}

    def test_thp_hole_reads_written(
        self, make_mem: MemFactory, track: Callable[..., Tracked], kernel_caps: Capabilities
    ) -> None:
        if kernel_caps.fix_pmd_hole_written is False:
            pytest.skip("unfixed kernel (probed): a zapped whole THP is neither reported nor re-armed")
        tracked = track(make_mem("thp", HPAGE_PMD_PAGES))
        mem = tracked.mem
        madvise(mem.addr, mem.length_bytes, MADV_DONTNEED)
        assert tracked.harvest() == set(range(HPAGE_PMD_PAGES))
        assert tracked.written() == set()
        mem.write([5])
        assert tracked.harvest() == {5}

    def test_never_touched_registered_pages_are_clean(
        self, make_mem: MemFactory, track: Callable[..., Tracked]
    ) -> None:
        tracked = track(make_mem("anon", 64))
        assert _categories(tracked.scanner, tracked.mem) == [(0, 64, C.WPALLOWED | C.SWAPPED)]
        assert tracked.harvest() == set()


class TestCategories:
    def test_unregistered_memory_reads_written_even_unpopulated(
        self, make_mem: MemFactory, scanner: PagemapScanner
    ) -> None:
        mem = make_mem("anon", 8)
        mem.write([2])
        assert _categories(scanner, mem) == [(0, 2, WRITTEN), (2, 3, WRITTEN | C.PRESENT), (3, 8, WRITTEN)]

    def test_registered_written_page(self, make_mem: MemFactory, track: Callable[..., Tracked]) -> None:
        tracked = track(make_mem("anon", 4))
        tracked.mem.write([1])
        assert _categories(tracked.scanner, tracked.mem) == [
            (0, 1, C.WPALLOWED | C.SWAPPED),
            (1, 2, C.WPALLOWED | WRITTEN | C.PRESENT),
            (2, 4, C.WPALLOWED | C.SWAPPED),
        ]

    def test_shared_memory_is_file(self, make_mem: MemFactory, scanner: PagemapScanner) -> None:
        mem = make_mem("memfd", 4)
        mem.write_all()
        assert _categories(scanner, mem) == [(0, 4, WRITTEN | C.FILE | C.PRESENT)]


class TestGuardPages:
    """MADV_GUARD_INSTALL markers (6.13+, GUARD category 6.16+)."""

    def _install(self, mem: Mem, first: int, n_pages: int) -> None:
        if libc.madvise(mem.page(first), n_pages * PAGE_SIZE, MADV_GUARD_INSTALL) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL:
                pytest.skip("MADV_GUARD_INSTALL is not supported")
            raise OSError(err, "madvise(MADV_GUARD_INSTALL)")

    def test_unregistered_guard_categories(self, make_mem: MemFactory, scanner: PagemapScanner) -> None:
        mem = make_mem("anon", 8)
        self._install(mem, 1, 2)
        guard = C.GUARD | C.SWAPPED | WRITTEN
        assert _categories(scanner, mem) == [(0, 1, WRITTEN), (1, 3, guard), (3, 8, WRITTEN)]

    def test_guard_installed_after_protect_is_reported_once(
        self, make_mem: MemFactory, track: Callable[..., Tracked]
    ) -> None:
        tracked = track(make_mem("anon", 8))
        self._install(tracked.mem, 1, 2)
        assert tracked.harvest() == {1, 2}
        assert tracked.harvest() == set()
        guarded = C.GUARD | C.SWAPPED | C.WPALLOWED
        assert _categories(tracked.scanner, tracked.mem)[1] == (1, 3, guarded)


class TestProtectionChanges:
    def test_mprotect_cycles_keep_written_state(self, make_mem: MemFactory, track: Callable[..., Tracked]) -> None:
        tracked = track(make_mem("anon", 2))
        mem = tracked.mem
        mem.write([0])
        for prot in (PROT_NONE, mmap.PROT_READ, RW):
            mprotect(mem.addr, mem.length_bytes, prot)
            assert tracked.written() == {0}
        assert tracked.harvest() == {0}
        mprotect(mem.addr, mem.length_bytes, mmap.PROT_READ)
        mprotect(mem.addr, mem.length_bytes, RW)
        mem.write([0, 1])
        assert tracked.harvest() == {0, 1}

    def test_map_fixed_replacement_needs_registering_again(
        self, make_mem: MemFactory, track: Callable[..., Tracked]
    ) -> None:
        tracked = track(make_mem("anon", 2))
        mem = tracked.mem
        mem.write_all()
        raw_mmap(mem.length_bytes, RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED, addr=mem.addr)
        with pytest.raises(NotRegistered):
            tracked.harvest()
        tracked.uffd.register(mem.addr, mem.length_bytes)
        tracked.protect()
        assert tracked.written() == set()
        mprotect(mem.addr, mem.length_bytes, PROT_NONE)
        mprotect(mem.addr, mem.length_bytes, RW)
        mem.write([1])
        assert tracked.harvest() == {1}

    def test_prot_none_with_overlapping_wp_scans_is_clean(
        self, make_mem: MemFactory, track: Callable[..., Tracked]
    ) -> None:
        mem = make_mem("anon", 16)
        mprotect(mem.addr, mem.length_bytes, PROT_NONE)
        tracked = track(mem)
        mprotect(mem.page(4), 4 * PAGE_SIZE, RW)
        assert page_set(tracked.scanner.harvest(mem.addr, mem.page(8)), mem.addr) == set()
        assert page_set(tracked.scanner.harvest(mem.page(4), mem.end), mem.addr) == set()
        assert tracked.written() == set()
        mem.write([5])
        assert tracked.harvest() == {5}


def test_unmapped_range_scans_empty(scanner: PagemapScanner) -> None:
    length = 16 * PAGE_SIZE
    addr = raw_mmap(length, RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    munmap(addr, length)
    raw = scanner.ioctl(addr, addr + length, flags=WP_SCAN, category_mask=WRITTEN, return_mask=WRITTEN)
    assert (raw.n_regions, raw.walk_end) == (0, addr + length)
