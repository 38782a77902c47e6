"""The userfaultfd lifecycle of docs/kernel.md §3: handshake, registration, fork, mremap, munmap, DONTNEED, close."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from writewatchd import AccessDenied, FeatureUnavailable, InvalidRange, KernelError, NotRegistered, RangeBusy
from writewatchd.kernel import PAGE_SIZE, Category, PagemapScanner, UffdFeature, Userfaultfd, read_maps
from writewatchd.kernel._libc import ioctl
from writewatchd.kernel.uffd import UFFD_API, UFFDIO_API, _UffdioApi

from .memhelpers import (
    HPAGE_PMD_PAGES,
    MADV_COLLAPSE,
    MADV_DONTNEED,
    MAP_FIXED,
    MAP_NORESERVE,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_NONE,
    WP_SCAN,
    WRITTEN,
    MemFactory,
    Tracked,
    libc,
    madvise,
    munmap,
    oserror,
    page_set,
    raw_mmap,
)

RW = mmap.PROT_READ | mmap.PROT_WRITE
ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS


@pytest.fixture
def fresh_uffd(uffd_features: UffdFeature) -> Iterator[Userfaultfd]:
    """A userfaultfd before the UFFDIO_API handshake."""
    with Userfaultfd.create(user_mode_only=True) as ctx:
        yield ctx


class TestHandshake:
    def test_second_api_on_the_same_fd_is_einval(self, fresh_uffd: Userfaultfd) -> None:
        fresh_uffd.api()
        arg = _UffdioApi(api=UFFD_API, features=int(UffdFeature.WP_ASYNC))
        assert ioctl(fresh_uffd.fileno(), UFFDIO_API, ctypes.byref(arg)) == -errno.EINVAL

    def test_api_on_an_initialized_context_reads_features_back(self, fresh_uffd: Userfaultfd) -> None:
        first = fresh_uffd.api()
        assert fresh_uffd.api() == first

    def test_wp_async_implies_wp_unpopulated(self, fresh_uffd: Userfaultfd) -> None:
        features = fresh_uffd.api(UffdFeature.WP_ASYNC)
        assert features & (UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED) == (
            UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED
        )

    def test_unknown_feature_is_feature_unavailable(self, fresh_uffd: Userfaultfd) -> None:
        with pytest.raises(FeatureUnavailable) as caught:
            fresh_uffd.api(UffdFeature(1 << 30))
        assert caught.value.errno == errno.EINVAL

    def test_register_before_api_is_einval(self, fresh_uffd: Userfaultfd, make_mem: MemFactory) -> None:
        mem = make_mem("anon", 4)
        with pytest.raises(KernelError) as caught:
            fresh_uffd.register(mem.addr, mem.length_bytes)
        assert caught.value.errno == errno.EINVAL


class TestRegistration:
    def test_second_context_is_range_busy(
        self, make_mem: MemFactory, track: Callable[..., Tracked], fresh_uffd: Userfaultfd
    ) -> None:
        mem = make_mem("anon", 4)
        track(mem)
        fresh_uffd.api()
        with pytest.raises(RangeBusy) as caught:
            fresh_uffd.register(mem.addr, mem.length_bytes)
        assert caught.value.errno == errno.EBUSY

    @pytest.mark.parametrize(("offset", "length_bytes"), [(8, PAGE_SIZE), (0, 100), (0, 0)])
    def test_unaligned_or_empty_is_invalid_range(
        self, uffd: Userfaultfd, make_mem: MemFactory, offset: int, length_bytes: int
    ) -> None:
        mem = make_mem("anon", 4)
        with pytest.raises(InvalidRange):
            uffd.register(mem.addr + offset, length_bytes)

    def test_hugetlb_needs_huge_page_alignment(self, uffd: Userfaultfd, make_mem: MemFactory) -> None:
        mem = make_mem("hugetlb", HPAGE_PMD_PAGES)
        with pytest.raises(KernelError) as caught:
            uffd.register(mem.addr, PAGE_SIZE)
        assert caught.value.errno == errno.EINVAL

    def test_read_only_shared_file_is_eperm(self, uffd: Userfaultfd, tmp_path: Path) -> None:
        path = tmp_path / "readonly.bin"
        path.write_bytes(b"\0" * 4 * PAGE_SIZE)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            addr = raw_mmap(4 * PAGE_SIZE, mmap.PROT_READ, mmap.MAP_SHARED, fd)
        finally:
            os.close(fd)
        try:
            with pytest.raises(AccessDenied) as caught:
                uffd.register(addr, 4 * PAGE_SIZE)
            assert caught.value.errno == errno.EPERM
        finally:
            munmap(addr, 4 * PAGE_SIZE)

    def test_sync_context_refuses_files_async_accepts(
        self, fresh_uffd: Userfaultfd, uffd: Userfaultfd, make_mem: MemFactory
    ) -> None:
        mem = make_mem("file_private", 4)
        fresh_uffd.api(UffdFeature(0))
        with pytest.raises(KernelError) as caught:
            fresh_uffd.register(mem.addr, mem.length_bytes)
        assert caught.value.errno == errno.EINVAL
        uffd.register(mem.addr, mem.length_bytes)

    def test_registering_splits_the_vma(self, make_mem: MemFactory, uffd: Userfaultfd) -> None:
        # A private memfd mapping never merges with a neighbouring VMA, so its bounds are exact.
        mem = make_mem("memfd_private", 12)
        uffd.register(mem.page(4), 4 * PAGE_SIZE)
        bounds = [(m.start, m.end) for m in read_maps() if mem.addr <= m.start < mem.end]
        assert bounds == [(mem.addr, mem.page(4)), (mem.page(4), mem.page(8)), (mem.page(8), mem.end)]

    def test_reregistration_starts_all_written(self, make_mem: MemFactory, track: Callable[..., Tracked]) -> None:
        tracked = track(make_mem("anon", 8))
        mem = tracked.mem
        mem.write_all()
        tracked.protect()
        assert tracked.written() == set()
        tracked.uffd.unregister(mem.addr, mem.length_bytes)
        tracked.uffd.register(mem.addr, mem.length_bytes)
        assert tracked.written() == set(range(8))

    def test_unprotect_makes_pages_written(self, make_mem: MemFactory, track: Callable[..., Tracked]) -> None:
        tracked = track(make_mem("anon", 8))
        tracked.mem.write_all()
        tracked.protect()
        tracked.uffd.write_protect(tracked.mem.page(2), 3 * PAGE_SIZE, protect=False)
        assert tracked.harvest() == {2, 3, 4}

    def test_kernel_mode_write_is_tracked(self, make_mem: MemFactory, track: Callable[..., Tracked]) -> None:
        """read(2) into a protected page works with a USER_MODE_ONLY context and marks it written."""
        tracked = track(make_mem("anon", 4))
        tracked.mem.write_all()
        tracked.protect()
        reader, writer = os.pipe()
        try:
            os.write(writer, b"kernel")
            assert libc.read(reader, ctypes.c_void_p(tracked.mem.page(2) + 100), 6) == 6
        finally:
            os.close(reader)
            os.close(writer)
        assert ctypes.string_at(tracked.mem.page(2) + 100, 6) == b"kernel"
        assert tracked.harvest() == {2}


class TestUnregistration:
    def test_unregister_drops_tracking(self, make_mem: MemFactory, track: Callable[..., Tracked]) -> None:
        tracked = track(make_mem("anon", 8))
        tracked.mem.write_all()
        tracked.protect()
        tracked.uffd.unregister(tracked.mem.addr, tracked.mem.length_bytes)
        with pytest.raises(NotRegistered):
            tracked.harvest()
        assert tracked.written() == set(range(8))

    def test_close_unregisters(self, uffd_features: UffdFeature, make_mem: MemFactory, scanner: PagemapScanner) -> None:
        mem = make_mem("anon", 8)
        ctx = Userfaultfd.create(user_mode_only=True)
        ctx.api()
        ctx.register(mem.addr, mem.length_bytes)
        mem.write_all()
        ctx.write_protect(mem.addr, mem.length_bytes)
        tracked = Tracked(mem, ctx, scanner)
        assert tracked.written() == set()
        ctx.close()
        with pytest.raises(NotRegistered):
            tracked.harvest()
        assert tracked.written() == set(range(8))
        assert tracked.written(category_mask=Category.WPALLOWED) == set()

    def test_a_dup_keeps_the_context_alive(
        self, uffd_features: UffdFeature, make_mem: MemFactory, scanner: PagemapScanner
    ) -> None:
        mem = make_mem("anon", 8)
        ctx = Userfaultfd.create(user_mode_only=True)
        ctx.api()
        ctx.register(mem.addr, mem.length_bytes)
        ctx.write_protect(mem.addr, mem.length_bytes)
        copy = os.dup(ctx.fileno())
        try:
            ctx.close()
            mem.write([3])
            assert page_set(scanner.harvest(mem.addr, mem.end), mem.addr) == {3}
        finally:
            os.close(copy)


class TestAddressSpaceChanges:
    def test_munmap_hole_scans_empty_and_new_mapping_is_unregistered(
        self, make_mem: MemFactory, track: Callable[..., Tracked]
    ) -> None:
        tracked = track(make_mem("anon", 12))
        mem = tracked.mem
        mem.write([1, 10])
        munmap(mem.page(4), 4 * PAGE_SIZE)
        raw = tracked.scanner.ioctl(mem.page(4), mem.page(8), flags=WP_SCAN, category_mask=WRITTEN)
        assert raw.n_regions == 0
        assert tracked.harvest() == {1, 10}
        raw_mmap(4 * PAGE_SIZE, RW, ANON | MAP_FIXED, addr=mem.page(4))
        with pytest.raises(NotRegistered):
            tracked.harvest()

    def test_mremap_destination_is_unregistered(self, make_mem: MemFactory, track: Callable[..., Tracked]) -> None:
        tracked = track(make_mem("anon", 8))
        source = tracked.mem
        source.write_all()
        tracked.protect()
        target = make_mem("anon", 8)
        moved = libc.mremap(
            source.addr, source.length_bytes, source.length_bytes, MREMAP_MAYMOVE | MREMAP_FIXED, target.addr
        )
        if moved in (None, ctypes.c_void_p(-1).value):
            raise oserror("mremap")
        # Keep the old range mapped so nothing else lands there before teardown unmaps it.
        raw_mmap(source.length_bytes, PROT_NONE, ANON | MAP_FIXED | MAP_NORESERVE, addr=source.addr)
        with pytest.raises(NotRegistered):
            tracked.scanner.harvest(target.addr, target.end)
        moved_mem = Tracked(target, tracked.uffd, tracked.scanner)
        assert moved_mem.written(category_mask=Category.WPALLOWED) == set()
        assert moved_mem.written() == set(range(8))

    def test_fork_child_is_unregistered_parent_stays_exact(
        self, make_mem: MemFactory, track: Callable[..., Tracked]
    ) -> None:
        tracked = track(make_mem("anon", 16))
        mem = tracked.mem
        mem.write_all()
        tracked.protect()
        mem.write([3])
        reader, writer = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(writer)
            os.read(reader, 1)
            os._exit(0)
        os.close(reader)
        try:
            mem.write([7])
            with PagemapScanner(child, capacity_regions=16) as child_pm:
                with pytest.raises(NotRegistered):
                    child_pm.harvest(mem.addr, mem.end)
                child_view = child_pm.scan(mem.addr, mem.end, category_mask=WRITTEN | Category.PRESENT)
                assert page_set(child_view.regions, mem.addr) == set(range(16))
                assert child_pm.scan(mem.addr, mem.end, category_mask=Category.WPALLOWED).regions.shape[0] == 0
            assert tracked.harvest() == {3, 7}
        finally:
            os.close(writer)
            os.waitpid(child, 0)


DONTNEED_CASES = [
    # (kind, content after MADV_DONTNEED, whether the pages read written)
    # Anonymous content becomes zeros: a real change, reported.
    ("anon", 0x00, True),
    # Shared memory keeps its content in the page cache: a marker is kept, the pages read clean.
    ("shmem", 0x77, False),
    ("memfd", 0x77, False),
    ("hugetlb_memfd", 0x77, False),
    ("hugetlb_shm", 0x77, False),
    # Hazards: the private copies are dropped and the content changes (back to the file, or to
    # zeros for private hugetlb), yet the kept marker makes the pages read clean.
    ("file_private", 0x01, False),
    ("memfd_private", 0x00, False),
    ("hugetlb", 0x00, False),
]


@pytest.mark.parametrize(("kind", "content", "reported"), DONTNEED_CASES, ids=[c[0] for c in DONTNEED_CASES])
def test_dontneed_after_protect(
    make_mem: MemFactory, track: Callable[..., Tracked], kind: str, content: int, reported: bool
) -> None:
    tracked = track(make_mem(kind, 8))
    mem = tracked.mem
    mem.write_all(0x77)
    tracked.protect()
    madvise(mem.addr, mem.length_bytes, MADV_DONTNEED)
    assert tracked.harvest() == (set(range(mem.n_pages)) if reported else set())
    assert mem.read(0) == content


def test_collapse_refuses_uffd_wp_ptes(make_mem: MemFactory, track: Callable[..., Tracked]) -> None:
    tracked = track(make_mem("thp", HPAGE_PMD_PAGES))
    mem = tracked.mem
    mem.write([0])
    assert libc.madvise(mem.addr, mem.length_bytes, MADV_COLLAPSE) == -1
    assert ctypes.get_errno() == errno.EINVAL
    tracked.uffd.write_protect(mem.addr, mem.length_bytes, protect=False)
    if libc.madvise(mem.addr, mem.length_bytes, MADV_COLLAPSE) != 0:
        pytest.skip(f"MADV_COLLAPSE failed after unprotecting too: {os.strerror(ctypes.get_errno())}")
    assert tracked.written(category_mask=Category.HUGE) == set(range(HPAGE_PMD_PAGES))
