"""The quirks of docs/kernel.md §1.6, §1.7, §5.1, §5.2 and the errno table of §1.4, against our exceptions."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import subprocess
from collections.abc import Callable

import pytest

from writewatchd import AccessDenied, FeatureUnavailable, InvalidRange, NotRegistered, ProcessGone, UsageError
from writewatchd.kernel import PAGE_SIZE, Category, PagemapScanner, RawScan, ScanFlag
from writewatchd.kernel._libc import ioctl
from writewatchd.kernel.pagemap import PmScanArg
from writewatchd.kernel.probe import Capabilities, ExitedScan

from .memhelpers import (
    HPAGE_PMD_PAGES,
    MAP_FIXED,
    PROT_NONE,
    WP_SCAN,
    WRITTEN,
    Mem,
    MemFactory,
    Tracked,
    munmap,
    page_set,
    raw_mmap,
    raw_pagemap_scan,
    region_list,
)

#: Regions the kernel collects before it drops the lock and copies out (PAGEMAP_WALK_SIZE >> PAGE_SHIFT).
KERNEL_BATCH_REGIONS = 512


class TestStaleWalkEnd:
    """§5.1: after an internal refill, a complete scan reports walk_end at the last refill's start."""

    N_PAGES = 4096

    @pytest.fixture
    def sparse(self, make_mem: MemFactory, track: Callable[..., Tracked]) -> Tracked:
        tracked = track(make_mem("anon", self.N_PAGES))
        tracked.mem.write(range(0, self.N_PAGES, 2))
        return tracked

    def test_raw_walk_end_is_stale_after_a_complete_scan(self, sparse: Tracked) -> None:
        mem = sparse.mem
        raw = sparse.scanner.ioctl(
            mem.addr, mem.end, flags=ScanFlag.WP_MATCHING, category_mask=WRITTEN, return_mask=WRITTEN
        )
        assert raw.n_regions == self.N_PAGES // 2
        assert page_set(sparse.scanner.buffer[: raw.n_regions], mem.addr) == set(range(0, self.N_PAGES, 2))
        assert sparse.written() == set()
        # The fourth 512-region refill started at page 3072 and ended normally, so walk_end kept that value.
        assert raw.walk_end == mem.page(3 * 2 * KERNEL_BATCH_REGIONS)
        assert raw.walk_end < mem.end

    @pytest.mark.parametrize("capacity", [600, 2048, 8192], ids=["several-calls", "vec-exactly-full", "one-call"])
    def test_harvest_reports_everything(self, sparse: Tracked, capacity: int) -> None:
        with PagemapScanner(capacity_regions=capacity) as pm:
            harvested = page_set(pm.harvest(sparse.mem.addr, sparse.mem.end), sparse.mem.addr)
        assert harvested == set(range(0, self.N_PAGES, 2))
        assert sparse.written() == set()

    def test_a_harvest_that_fills_the_buffer_grows_it_up_to_the_bound(self, sparse: Tracked) -> None:
        expected = set(range(0, self.N_PAGES, 2))  # N_PAGES // 2 = 2048 regions
        with PagemapScanner(capacity_regions=600, max_capacity_regions=1 << 20) as pm:
            assert page_set(pm.harvest(sparse.mem.addr, sparse.mem.end), sparse.mem.addr) == expected
            assert pm.capacity_regions == 4096  # the next power of two above 2048: one ioctl next time
            sparse.mem.write_all()
            assert page_set(pm.harvest(sparse.mem.addr, sparse.mem.end), sparse.mem.addr) == set(range(self.N_PAGES))
        with PagemapScanner(capacity_regions=600, max_capacity_regions=1000) as pm:
            sparse.scanner.harvest(sparse.mem.addr, sparse.mem.end)
            sparse.mem.write(range(0, self.N_PAGES, 2))
            assert page_set(pm.harvest(sparse.mem.addr, sparse.mem.end), sparse.mem.addr) == expected
            assert pm.capacity_regions == 1000
        assert sparse.written() == set()

    @pytest.mark.parametrize("capacity", [600, 2048, 8192], ids=["several-calls", "vec-exactly-full", "one-call"])
    def test_scan_reports_everything_once(self, sparse: Tracked, capacity: int) -> None:
        with PagemapScanner(capacity_regions=capacity) as pm:
            result = pm.scan(sparse.mem.addr, sparse.mem.end, category_mask=WRITTEN, return_mask=WRITTEN)
        assert result.complete
        assert region_list(result.regions, sparse.mem.addr) == [(p, p + 1) for p in range(0, self.N_PAGES, 2)]


class TestPartialWorkBeforeEperm:
    """§5.2: CHECK_WPASYNC fails on the unregistered half after re-protecting the registered half."""

    @pytest.fixture
    def half(self, make_mem: MemFactory, track: Callable[..., Tracked]) -> Tracked:
        mem = make_mem("anon", 20)
        tracked = track(Mem("anon", mem.addr, 10 * PAGE_SIZE))
        mem.write_all()
        return Tracked(mem, tracked.uffd, tracked.scanner)

    def test_eperm_is_not_registered(self, half: Tracked) -> None:
        with pytest.raises(NotRegistered) as caught:
            half.harvest()
        assert caught.value.errno == errno.EPERM

    def test_registered_half_was_reprotected_and_copied_out(self, half: Tracked) -> None:
        mem = half.mem
        assert half.written(0, 10) == set(range(10))
        buffer = (ctypes.c_uint64 * 12)()
        result, arg = raw_pagemap_scan(
            half.scanner.fileno(),
            start=mem.addr,
            end=mem.end,
            flags=int(WP_SCAN),
            vec=ctypes.addressof(buffer),
            vec_len=4,
            category_mask=WRITTEN,
            return_mask=WRITTEN,
        )
        assert result == -errno.EPERM
        # The hazard: the written pages of the registered half are now clean, their only record is vec.
        assert half.written(0, 10) == set()
        assert (buffer[0], buffer[1]) == (mem.addr, mem.page(10))
        assert arg.walk_end == mem.end

    def test_without_check_the_unregistered_half_is_skipped(self, half: Tracked) -> None:
        result = half.scanner.scan(
            half.mem.addr, half.mem.end, flags=ScanFlag.WP_MATCHING, category_mask=WRITTEN, return_mask=WRITTEN
        )
        assert region_list(result.regions, half.mem.addr) == [(0, 10)]


class TestHugetlbSmallMaxPages:
    """§1.6: a hugetlb page larger than max_pages is backed out, unreported and still WRITTEN."""

    @pytest.fixture
    def huge(self, make_mem: MemFactory, track: Callable[..., Tracked]) -> Tracked:
        tracked = track(make_mem("hugetlb", 2 * HPAGE_PMD_PAGES))
        tracked.mem.write_all()
        return tracked

    def test_partial_huge_page_is_skipped_and_walk_goes_on(self, huge: Tracked) -> None:
        mem = huge.mem
        raw = huge.scanner.ioctl(
            mem.addr, mem.end, flags=ScanFlag.WP_MATCHING, category_mask=WRITTEN, return_mask=WRITTEN, max_pages=256
        )
        assert raw.n_regions == 0
        # walk_end is the start of the last backed-out huge page, not of the first.
        assert raw.walk_end == mem.page(HPAGE_PMD_PAGES)
        assert huge.written() == set(range(mem.n_pages))

    def test_scan_with_small_max_pages_looks_complete(self, huge: Tracked) -> None:
        result = huge.scanner.scan(
            huge.mem.addr, huge.mem.end, flags=ScanFlag.WP_MATCHING, category_mask=WRITTEN, max_pages=256
        )
        assert (result.regions.shape[0], result.complete) == (0, True)
        assert huge.harvest() == set(range(huge.mem.n_pages))

    def test_max_pages_of_one_huge_page_works(self, huge: Tracked) -> None:
        result = huge.scanner.scan(
            huge.mem.addr, huge.mem.end, flags=ScanFlag.WP_MATCHING, category_mask=WRITTEN, max_pages=HPAGE_PMD_PAGES
        )
        assert region_list(result.regions, huge.mem.addr) == [(0, HPAGE_PMD_PAGES)]
        assert huge.written() == set(range(HPAGE_PMD_PAGES, 2 * HPAGE_PMD_PAGES))


class TestExclusiveWriteProtect:
    """§1.7: WP_MATCHING without an output buffer protects every PTE, whatever the masks say."""

    @pytest.fixture
    def written(self, make_mem: MemFactory, track: Callable[..., Tracked]) -> Tracked:
        tracked = track(make_mem("anon", 32))
        tracked.mem.write_all()
        return tracked

    @pytest.mark.parametrize(
        "masks",
        [
            {"category_mask": Category.FILE},
            {"category_mask": WRITTEN, "category_inverted": WRITTEN},
            {"category_anyof_mask": Category.SWAPPED},
            {"category_mask": WRITTEN, "max_pages": 1},
        ],
        ids=["mask-file", "not-written", "anyof-swapped", "max-pages-1"],
    )
    def test_masks_are_ignored_without_vec(self, written: Tracked, masks: dict[str, int]) -> None:
        raw = written.scanner.ioctl(written.mem.addr, written.mem.end, flags=ScanFlag.WP_MATCHING, vec_len=0, **masks)
        assert raw.n_regions == 0
        assert written.written() == set()

    def test_masks_apply_with_a_vec(self, written: Tracked) -> None:
        written.scanner.scan(written.mem.addr, written.mem.end, flags=ScanFlag.WP_MATCHING, category_mask=Category.FILE)
        assert written.written() == set(range(32))


@pytest.fixture
def tracked10(make_mem: MemFactory, track: Callable[..., Tracked]) -> Tracked:
    return track(make_mem("anon", 10))


class TestErrnoTable:
    """§1.4: each kernel refusal and the exception our layer turns it into."""

    def test_unknown_category_is_feature_unavailable(self, tracked10: Tracked) -> None:
        with pytest.raises(FeatureUnavailable) as caught:
            tracked10.scanner.ioctl(tracked10.mem.addr, tracked10.mem.end, category_mask=1 << 9)
        assert caught.value.errno == errno.EINVAL

    def test_unknown_category_is_refused_before_the_kernel(self, tracked10: Tracked) -> None:
        with pytest.raises(UsageError):
            tracked10.scanner.scan(tracked10.mem.addr, tracked10.mem.end, return_mask=1 << 9)

    @pytest.mark.parametrize("method", ["ioctl", "scan", "harvest"])
    def test_unaligned_start_is_invalid_range(self, tracked10: Tracked, method: str) -> None:
        with pytest.raises(InvalidRange):
            getattr(tracked10.scanner, method)(tracked10.mem.addr + 8, tracked10.mem.end)

    @pytest.mark.parametrize("method", ["ioctl", "scan"])
    def test_end_below_start_is_invalid_range(self, tracked10: Tracked, method: str) -> None:
        with pytest.raises(InvalidRange):
            getattr(tracked10.scanner, method)(tracked10.mem.end, tracked10.mem.addr)

    def test_end_beyond_user_space_is_invalid_range(self, tracked10: Tracked) -> None:
        with pytest.raises(InvalidRange):
            tracked10.scanner.ioctl(tracked10.mem.addr, 1 << 63)

    def test_unregistered_with_check_is_not_registered(self, make_mem: MemFactory, scanner: PagemapScanner) -> None:
        mem = make_mem("anon", 4)
        with pytest.raises(NotRegistered):
            scanner.harvest(mem.addr, mem.end)

    def test_unaligned_end_is_rounded_up(self, tracked10: Tracked) -> None:
        tracked10.mem.write([0, 1])
        result = tracked10.scanner.scan(
            tracked10.mem.addr, tracked10.mem.addr + 1, category_mask=WRITTEN, return_mask=WRITTEN
        )
        assert region_list(result.regions, tracked10.mem.addr) == [(0, 1)]

    @pytest.mark.parametrize("size", [88, 104])
    def test_struct_size_must_be_96(self, tracked10: Tracked, size: int) -> None:
        result, _ = raw_pagemap_scan(tracked10.scanner.fileno(), size=size, start=tracked10.mem.addr)
        assert result == -errno.EINVAL

    def test_kernel_address_vec_is_efault(self, tracked10: Tracked) -> None:
        result, _ = raw_pagemap_scan(
            tracked10.scanner.fileno(), start=tracked10.mem.addr, end=tracked10.mem.end, vec=1 << 63, vec_len=4
        )
        assert result == -errno.EFAULT

    @pytest.mark.parametrize(("written", "expected"), [(False, 0), (True, -errno.EFAULT)], ids=["clean", "written"])
    def test_bad_vec_faults_only_with_something_to_copy(self, tracked10: Tracked, written: bool, expected: int) -> None:
        if written:
            tracked10.mem.write([3])
        result, _ = raw_pagemap_scan(
            tracked10.scanner.fileno(),
            start=tracked10.mem.addr,
            end=tracked10.mem.end,
            vec=8,
            vec_len=4,
            category_mask=WRITTEN,
        )
        assert result == expected

    @pytest.mark.parametrize("request_number", [0xC0486610, 0x5401], ids=["v10-number", "TCGETS"])
    def test_other_ioctls_are_einval(self, tracked10: Tracked, request_number: int) -> None:
        arg = PmScanArg(size=ctypes.sizeof(PmScanArg))
        assert ioctl(tracked10.scanner.fileno(), request_number, ctypes.byref(arg)) == -errno.EINVAL

    def test_readonly_fd_may_write_protect(self, tracked10: Tracked) -> None:
        tracked10.mem.write_all()
        assert tracked10.harvest() == set(range(10))
        assert tracked10.written() == set()


class TestProcessErrors:
    @pytest.mark.parametrize("reaped", [False, True], ids=["zombie", "reaped"])
    def test_exited_target_scan_is_gone_or_empty_as_probed(
        self, sleeper: subprocess.Popen[bytes], reaped: bool, kernel_caps: Capabilities
    ) -> None:
        """Builds differ (ESRCH or nothing, docs/kernel.md §8.1); never a region, and as doctor says."""
        with PagemapScanner(sleeper.pid) as pm:
            sleeper.kill()
            if reaped:
                sleeper.wait()
            else:
                os.waitid(os.P_PID, sleeper.pid, os.WEXITED | os.WNOWAIT)
            try:
                raw = pm.ioctl(0, PAGE_SIZE)
            except ProcessGone as exc:
                assert exc.errno == errno.ESRCH
                answer = ExitedScan.PROCESS_GONE
            else:
                assert raw == RawScan(0, PAGE_SIZE)
                answer = ExitedScan.EMPTY
        assert answer == (kernel_caps.exited_scan_reaped if reaped else kernel_caps.exited_scan_zombie)

    def test_opening_a_gone_pid_is_process_gone(self, sleeper: subprocess.Popen[bytes]) -> None:
        sleeper.kill()
        sleeper.wait()
        with pytest.raises(ProcessGone):
            PagemapScanner(sleeper.pid)

    def test_other_uid_target_is_access_denied(self, sleeper: subprocess.Popen[bytes]) -> None:
        if os.geteuid() != 0:
            pytest.skip("needs root to drop to another uid")
        child = os.fork()
        if child == 0:
            code = 3
            try:
                os.setresuid(65534, 65534, 65534)
                PagemapScanner(sleeper.pid)
                code = 0
            except AccessDenied:
                code = 1
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 1

    def test_fd_opened_before_dropping_privileges_keeps_working(self, make_mem: MemFactory) -> None:
        if os.geteuid() != 0:
            pytest.skip("needs root to drop to another uid")
        mem = make_mem("anon", 4)
        mem.write([1])
        pm = PagemapScanner(os.getpid(), capacity_regions=8)
        child = os.fork()
        if child == 0:
            code = 3
            try:
                os.setresuid(65534, 65534, 65534)
                result = pm.scan(mem.addr, mem.end, category_mask=Category.PRESENT)
                code = 0 if page_set(result.regions, mem.addr) == {1} else 2
            finally:
                os._exit(code)
        pm.close()
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_holes_between_vmas_are_skipped_with_check(make_mem: MemFactory, track: Callable[..., Tracked]) -> None:
    """CHECK_WPASYNC ignores unmapped space; registered VMAs around a hole still report."""
    area = raw_mmap(12 * PAGE_SIZE, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED
        raw_mmap(4 * PAGE_SIZE, prot, flags, addr=area)
        raw_mmap(4 * PAGE_SIZE, prot, flags, addr=area + 8 * PAGE_SIZE)
        munmap(area + 4 * PAGE_SIZE, 4 * PAGE_SIZE)
        whole = Mem("anon", area, 12 * PAGE_SIZE)
        first = track(Mem("anon", area, 4 * PAGE_SIZE))
        track(Mem("anon", area + 8 * PAGE_SIZE, 4 * PAGE_SIZE))
        whole.write([1, 9])
        harvested = first.scanner.harvest(area, whole.end)
        assert page_set(harvested, area) == {1, 9}
    finally:
        munmap(area, 12 * PAGE_SIZE)
