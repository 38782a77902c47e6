"""Win32 write-watch semantics of :class:`WriteWatch`, on real memory of this process.

The cases follow what Wine pins for ``GetWriteWatch``/``ResetWriteWatch`` in its kernel32
conformance test (and what its ntdll implementation checks), restated for our API:

- a fresh watch reports nothing; each written page is reported once, ascending, by page
  address; reads never count; a store straddling a page boundary dirties both pages;
- ``reset`` resets exactly the pages returned, so a ``max_count`` below the dirty count
  leaves the rest for the next call; ``ResetWriteWatch`` forgets every write in its range;
- ``max_count <= 0`` and unknown flags are usage errors; a range that is not wholly inside
  one watch (partly outside, across two watches, unwatched memory, empty) is refused;
- base and size are rounded out to whole pages;
- changing page protection neither adds nor loses writes;
- kernel-mode writes (``read(2)`` into a watched buffer) count.

Known differences from Windows, each pinned by a test below:

- A kernel-mode write is reported for the pages the kernel actually wrote. Windows reports
  the whole buffer handed to ``ReadFile`` (all 16 pages in Wine's test, even for a 0-byte
  read), because it faults the buffer in for writing up front.
- ``MADV_DONTNEED`` (Windows' decommit) zeroes anonymous pages, so they read as written
  afterwards. Windows keeps only the writes made before the decommit.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from writewatchd import InvalidRange, KernelError, NotRegistered, UsageError
from writewatchd.kernel import PAGE_SIZE, Category, PagemapScanner, ScanFlag
from writewatchd.tracking import WRITE_WATCH_FLAG_RESET, WriteWatch

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

PROT_NONE = 0
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
HPAGE_PMD_BYTES = 2 << 20
N_PAGES = 16  # Wine's test buffer: 0x10000 bytes


@dataclass
class Buffer:
    """A private anonymous mapping with its address, so both Python and ctypes can touch it."""

    mapping: mmap.mmap
    addr: int
    length_bytes: int

    @property
    def end(self) -> int:
        return self.addr + self.length_bytes

    def page(self, index: int) -> int:
        return self.addr + index * PAGE_SIZE

    def write(self, *indices: int) -> None:
        """One native byte store into each page (ctypes releases the GIL)."""
        for index in indices:
            ctypes.memset(self.page(index), 0x5A, 1)

    def read_all(self) -> int:
        """Read one byte of every page; returns their sum so the reads have a use."""
        return sum(self.mapping[i * PAGE_SIZE] for i in range(self.length_bytes // PAGE_SIZE))


MakeBuffer = Callable[..., Buffer]


def _map(length_bytes: int) -> Buffer:
    m = mmap.mmap(-1, length_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(m)
    addr = ctypes.addressof(view)
    del view  # release the buffer export so the mapping can be closed later
    return Buffer(m, addr, length_bytes)


@pytest.fixture
def make_buffer() -> Iterator[MakeBuffer]:
    made: list[Buffer] = []

    def make(n_pages: int = N_PAGES) -> Buffer:
        buf = _map(n_pages * PAGE_SIZE)
        made.append(buf)
        return buf

    yield make
    for buf in made:
        buf.mapping.close()


@pytest.fixture
def ww() -> Iterator[WriteWatch]:
    try:
        watch = WriteWatch()
    except KernelError as exc:
        pytest.skip(f"async write-protect userfaultfd is unavailable: {exc}")
    with watch:
        yield watch


@pytest.fixture
def buf(make_buffer: MakeBuffer, ww: WriteWatch) -> Buffer:
    """A watched 16-page buffer."""
    b: Buffer = make_buffer()
    ww.watch(b.addr, b.length_bytes)
    return b


def written(ww: WriteWatch, buf: Buffer, *, reset: bool = False, max_count: int = 64) -> list[int]:
    """Page indices that ``get_write_watch`` reports over the whole buffer."""
    result = ww.get_write_watch(buf.addr, buf.length_bytes, max_count=max_count, reset=reset)
    assert result.granularity == PAGE_SIZE
    return [(a - buf.addr) // PAGE_SIZE for a in result.addresses]


def harvested_pages(regions: np.ndarray, base: int) -> list[int]:
    return [p for start, end in regions.tolist() for p in range((start - base) // PAGE_SIZE, (end - base) // PAGE_SIZE)]


# --- the basic sequence of Wine's test ------------------------------------------------------


def test_fresh_watch_reports_nothing(ww: WriteWatch, buf: Buffer) -> None:
    assert written(ww, buf) == []


def test_write_is_reported_once_per_page_by_page_address(ww: WriteWatch, buf: Buffer) -> None:
    ctypes.memset(buf.page(1) + 1, 0x44, 1)
    ctypes.memset(buf.page(1) + 100, 0x44, 1)
    assert ww.get_write_watch(buf.addr, buf.length_bytes, max_count=64).addresses == [buf.page(1)]
    # Without reset the report repeats; with reset it is reported one last time, then gone.
    assert written(ww, buf) == [1]
    assert written(ww, buf, reset=True) == [1]
    assert written(ww, buf) == []


def test_reports_are_ascending(ww: WriteWatch, buf: Buffer) -> None:
    buf.write(9, 4, 2, 15, 0)
    assert written(ww, buf) == [0, 2, 4, 9, 15]


def test_reset_flag_is_the_same_as_reset_true(ww: WriteWatch, buf: Buffer) -> None:
    buf.write(3)
    result = ww.get_write_watch(buf.addr, buf.length_bytes, max_count=64, flags=WRITE_WATCH_FLAG_RESET)
    assert result.addresses == [buf.page(3)]
    assert written(ww, buf) == []


def test_subrange_reports_only_its_pages(ww: WriteWatch, buf: Buffer) -> None:
    buf.write(2, 4)
    result = ww.get_write_watch(buf.page(3), 2 * PAGE_SIZE, max_count=64)
    assert result.addresses == [buf.page(4)]


def test_reset_write_watch_forgets_only_its_range(ww: WriteWatch, buf: Buffer) -> None:
    buf.write(1, 2, 4)
    ww.reset_write_watch(buf.addr, 3 * PAGE_SIZE)
    assert written(ww, buf) == [4]
    ww.reset_write_watch(buf.addr, buf.length_bytes)
    assert written(ww, buf) == []


def test_store_across_a_page_boundary_dirties_both_pages(ww: WriteWatch, buf: Buffer) -> None:
    buf.write(4)
    ctypes.c_uint32.from_address(buf.page(2) - 2).value = 0xDEADBEEF
    assert written(ww, buf) == [1, 2, 4]


def test_reset_with_small_max_count_resets_only_the_pages_returned(ww: WriteWatch, buf: Buffer) -> None:
    buf.write(1, 2, 4)
    assert written(ww, buf, reset=True, max_count=1) == [1]
    assert written(ww, buf) == [2, 4]
    assert written(ww, buf, reset=True, max_count=2) == [2, 4]
    assert written(ww, buf) == []


def test_max_count_caps_the_report_without_reset(ww: WriteWatch, buf: Buffer) -> None:
    buf.write(*range(3, 13))
    assert written(ww, buf, max_count=4) == [3, 4, 5, 6]
    assert written(ww, buf) == list(range(3, 13))


def test_reads_are_never_reported(ww: WriteWatch, make_buffer: MakeBuffer) -> None:
    # Read before the watch (zero page mapped) and after it (fault on a protected marker).
    before: Buffer = make_buffer()
    before.read_all()
    ww.watch(before.addr, before.length_bytes)
    after: Buffer = make_buffer()
    ww.watch(after.addr, after.length_bytes)
    assert before.read_all() == 0
    assert after.read_all() == 0
    assert written(ww, before) == []
    assert written(ww, after) == []
    after.write(7)
    after.read_all()
    assert written(ww, after) == [7]


def test_protection_changes_neither_add_nor_lose_writes(ww: WriteWatch, buf: Buffer) -> None:
    buf.write(2, 4)
    assert _libc.mprotect(buf.addr, 3 * PAGE_SIZE, mmap.PROT_READ) == 0
    assert _libc.mprotect(buf.addr, 3 * PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE) == 0
    assert written(ww, buf) == [2, 4]


def test_initial_protection_does_not_matter(ww: WriteWatch, make_buffer: MakeBuffer) -> None:
    # Wine: watched PROT_NONE memory is clean; writes made while it was writable stay reported.
    b: Buffer = make_buffer()
    assert _libc.mprotect(b.addr, b.length_bytes, PROT_NONE) == 0
    ww.watch(b.addr, b.length_bytes)
    assert written(ww, b) == []
    assert _libc.mprotect(b.addr, 6 * PAGE_SIZE, mmap.PROT_READ | mmap.PROT_WRITE) == 0
    ctypes.memset(b.page(5) + 200, 3, 1)
    assert _libc.mprotect(b.addr, 6 * PAGE_SIZE, PROT_NONE) == 0
    assert written(ww, b) == [5]


def test_decommit_reads_as_written_unlike_windows(ww: WriteWatch, buf: Buffer) -> None:
    # Difference from Windows: MADV_DONTNEED replaces the pages with zeros, which is a change
    # of content, so every page in the range reads written (Windows kept just page 5).
    buf.write(5)
    assert _libc.madvise(buf.addr, 8 * PAGE_SIZE, MADV_DONTNEED) == 0
    assert written(ww, buf) == list(range(8))


# --- kernel-mode writes ---------------------------------------------------------------------


def test_kernel_mode_write_reports_the_pages_actually_written(ww: WriteWatch, buf: Buffer) -> None:
    # Difference from Windows: read(2) of 2 pages + 3 bytes into the 16-page buffer dirties 3
    # pages here; Windows reports all 16 pages of the buffer given to ReadFile.
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        with memoryview(buf.mapping) as view:
            assert os.preadv(fd, [view[: 2 * PAGE_SIZE + 3]], 0) == 2 * PAGE_SIZE + 3
    finally:
        os.close(fd)
    assert written(ww, buf, reset=True) == [0, 1, 2]


def test_kernel_mode_write_into_unaligned_scattered_buffers(ww: WriteWatch, buf: Buffer) -> None:
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        with memoryview(buf.mapping) as view:
            parts = [view[5 * PAGE_SIZE - 1 : 5 * PAGE_SIZE + 1], view[9 * PAGE_SIZE + 7 : 9 * PAGE_SIZE + 8]]
            assert os.readv(fd, parts) == 3
            for part in parts:
                part.release()
    finally:
        os.close(fd)
    assert written(ww, buf) == [4, 5, 9]


def test_kernel_mode_read_of_nothing_reports_nothing(ww: WriteWatch, buf: Buffer, tmp_path: Path) -> None:
    # Difference from Windows, which reports the whole buffer even for a 0-byte ReadFile.
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    fd = os.open(empty, os.O_RDONLY)
    try:
        with memoryview(buf.mapping) as view:
            assert os.readv(fd, [view]) == 0
    finally:
        os.close(fd)
    assert written(ww, buf) == []


def test_failed_kernel_mode_read_reports_nothing(ww: WriteWatch, buf: Buffer) -> None:
    # As on Windows (ReadFile on an invalid handle): no write, no report.
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    with memoryview(buf.mapping) as view, pytest.raises(OSError):
        os.readv(write_fd, [view])
    os.close(write_fd)
    assert written(ww, buf) == []


# --- argument checks ------------------------------------------------------------------------


@pytest.mark.parametrize("max_count", [0, -1])
def test_max_count_must_be_positive(ww: WriteWatch, buf: Buffer, max_count: int) -> None:
    with pytest.raises(UsageError):
        ww.get_write_watch(buf.addr, buf.length_bytes, max_count=max_count)


@pytest.mark.parametrize("flags", [2, 0xDEADBEEF, 1 | 4])
def test_unknown_flags_are_refused(ww: WriteWatch, buf: Buffer, flags: int) -> None:
    buf.write(1)
    with pytest.raises(UsageError):
        ww.get_write_watch(buf.addr, buf.length_bytes, max_count=64, flags=flags)
    assert written(ww, buf) == [1]  # a refused call resets nothing


@pytest.mark.parametrize(
    ("offset_pages", "length_bytes"),
    [
        (0, 2 * N_PAGES * PAGE_SIZE),  # twice the watch
        (N_PAGES - 1, PAGE_SIZE + 1),  # last page plus one byte past the end
        (-1, 2 * PAGE_SIZE),  # starts one page before the watch
        (0, 0),  # empty
    ],
)
def test_range_not_wholly_inside_the_watch_is_refused(
    ww: WriteWatch, buf: Buffer, offset_pages: int, length_bytes: int
) -> None:
    buf.write(0, N_PAGES - 1)
    address = buf.page(offset_pages)
    with pytest.raises(InvalidRange):
        ww.get_write_watch(address, length_bytes, max_count=64, reset=True)
    with pytest.raises(InvalidRange):
        ww.reset_write_watch(address, length_bytes)
    with pytest.raises(InvalidRange):
        ww.harvest(address, length_bytes)
    assert written(ww, buf) == [0, N_PAGES - 1]


def test_range_across_two_watches_is_refused(ww: WriteWatch, make_buffer: MakeBuffer) -> None:
    b: Buffer = make_buffer(8)
    half = 4 * PAGE_SIZE
    ww.watch(b.addr, half)
    ww.watch(b.addr + half, half)
    b.write(3, 4)
    with pytest.raises(InvalidRange):
        ww.get_write_watch(b.page(2), half, max_count=64)
    with pytest.raises(InvalidRange):
        ww.reset_write_watch(b.page(2), half)
    assert ww.get_write_watch(b.addr, half, max_count=64).addresses == [b.page(3)]
    assert ww.get_write_watch(b.addr + half, half, max_count=64).addresses == [b.page(4)]


def test_unwatched_memory_is_refused(ww: WriteWatch, buf: Buffer, make_buffer: MakeBuffer) -> None:
    other: Buffer = make_buffer()
    other.write(0)
    for address in (other.addr, 0):
        with pytest.raises(InvalidRange):
            ww.get_write_watch(address, PAGE_SIZE, max_count=64)
        with pytest.raises(InvalidRange):
            ww.reset_write_watch(address, PAGE_SIZE)


def test_unaligned_base_and_size_round_out_to_pages(ww: WriteWatch, buf: Buffer) -> None:
    buf.write(1, 2, 3)
    # One byte inside page 1 covers page 1.
    assert ww.get_write_watch(buf.page(1) + 100, 1, max_count=64).addresses == [buf.page(1)]
    # Two bytes straddling the 1|2 boundary cover both pages.
    assert ww.get_write_watch(buf.page(2) - 1, 2, max_count=64).addresses == [buf.page(1), buf.page(2)]
    # The last byte of the watch is still inside it.
    ww.reset_write_watch(buf.end - 1, 1)
    # A one-byte reset forgets its whole page.
    ww.reset_write_watch(buf.page(2) + 4095, 1)
    assert written(ww, buf) == [1, 3]


# --- watch lifecycle ------------------------------------------------------------------------


def test_watch_must_be_page_aligned(ww: WriteWatch, make_buffer: MakeBuffer) -> None:
    b: Buffer = make_buffer()
    with pytest.raises(InvalidRange):
        ww.watch(b.addr + 1, PAGE_SIZE)
    with pytest.raises(InvalidRange):
        ww.watch(b.addr, PAGE_SIZE + 1)


def test_overlapping_watch_is_refused(ww: WriteWatch, buf: Buffer) -> None:
    buf.write(2)
    for address, length in (
        (buf.addr, PAGE_SIZE),
        (buf.page(N_PAGES - 1), 2 * PAGE_SIZE),
        (buf.addr, buf.length_bytes),
    ):
        with pytest.raises(InvalidRange):
            ww.watch(address, length)
    assert written(ww, buf) == [2]  # the refused watch did not re-protect anything


def test_unwatch_then_get_is_refused_and_rewatch_starts_clean(ww: WriteWatch, buf: Buffer) -> None:
    buf.write(2)
    with pytest.raises(InvalidRange):
        ww.unwatch(buf.addr, PAGE_SIZE)  # not the range that was watched
    ww.unwatch(buf.addr, buf.length_bytes)
    with pytest.raises(InvalidRange):
        ww.get_write_watch(buf.addr, buf.length_bytes, max_count=64)
    with pytest.raises(InvalidRange):
        ww.unwatch(buf.addr, buf.length_bytes)
    buf.write(3)
    ww.watch(buf.addr, buf.length_bytes)
    assert written(ww, buf) == []
    buf.write(4)
    assert written(ww, buf) == [4]


def test_close_releases_every_watch(make_buffer: MakeBuffer) -> None:
    a: Buffer = make_buffer()
    b: Buffer = make_buffer()
    first = WriteWatch()
    first.watch(a.addr, a.length_bytes)
    first.watch(b.addr, b.length_bytes)
    a.write(1)
    first.close()
    with pytest.raises(InvalidRange):
        first.get_write_watch(a.addr, a.length_bytes, max_count=64)
    # The kernel no longer has the memory registered for async write-protect ...
    with PagemapScanner() as scanner, pytest.raises(NotRegistered):
        scanner.scan(a.addr, a.end, flags=ScanFlag.CHECK_WPASYNC, category_mask=Category.WRITTEN)
    # ... so another WriteWatch (another userfaultfd) can take both ranges.
    with WriteWatch() as second:
        second.watch(a.addr, a.length_bytes)
        second.watch(b.addr, b.length_bytes)
        b.write(6)
        assert written(second, a) == []
        assert written(second, b) == [6]


# --- harvest --------------------------------------------------------------------------------


def test_harvest_returns_merged_regions_and_resets(ww: WriteWatch, buf: Buffer) -> None:
    buf.write(1, 2, 3, 7, 9, 10)
    regions = ww.harvest(buf.addr, buf.length_bytes)
    assert regions.dtype == np.uint64
    assert regions.tolist() == [[buf.page(1), buf.page(4)], [buf.page(7), buf.page(8)], [buf.page(9), buf.page(11)]]
    assert written(ww, buf) == []
    assert ww.harvest(buf.addr, buf.length_bytes).shape == (0, 2)


def test_harvest_of_a_subrange_resets_only_it(ww: WriteWatch, buf: Buffer) -> None:
    buf.write(1, 2, 3, 7)
    regions = ww.harvest(buf.page(2), 4 * PAGE_SIZE)
    assert regions.tolist() == [[buf.page(2), buf.page(4)]]
    assert written(ww, buf) == [1, 7]


def test_harvest_of_more_regions_than_one_buffer_holds(ww: WriteWatch, make_buffer: MakeBuffer) -> None:
    # Every other page of 2^17 + 6 pages: more isolated regions than one ioctl returns.
    n_pages = 2 * (1 << 16) + 12
    b: Buffer = make_buffer(n_pages)
    ww.watch(b.addr, b.length_bytes)
    view = np.frombuffer(b.mapping, dtype=np.uint8)
    view[0 :: 2 * PAGE_SIZE] = 1
    del view
    regions = ww.harvest(b.addr, b.length_bytes)
    expected = np.arange(0, n_pages, 2, dtype=np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(b.addr)
    np.testing.assert_array_equal(regions[:, 0], expected)
    np.testing.assert_array_equal(regions[:, 1], expected + np.uint64(PAGE_SIZE))
    assert ww.harvest(b.addr, b.length_bytes).shape == (0, 2)


# --- threads --------------------------------------------------------------------------------


def test_concurrent_writers_and_harvests_lose_nothing(ww: WriteWatch, make_buffer: MakeBuffer) -> None:
    # 4 writer threads store into interleaved pages (ctypes.memset releases the GIL) while
    # the main thread harvests. Each page is written exactly once, so the union of the
    # harvests must be exactly the written set: a write that a concurrent re-protect
    # swallowed would be missing from it.
    #
    # A page may be reported twice for its one store, and that is correct: the store faults,
    # the fault makes the page writable, a harvest reports and re-protects it before the
    # preempted thread retries the store, and the retry faults and marks it written again.
    n_pages = 8192
    b: Buffer = make_buffer(n_pages)
    ww.watch(b.addr, b.length_bytes)
    rng = random.Random(1234)
    plans = []
    for thread_index in range(4):
        own = [p for p in range(thread_index, n_pages, 4) if rng.random() < 0.5]
        rng.shuffle(own)
        plans.append(own)
    start = threading.Barrier(5)

    def writer(pages: list[int]) -> None:
        start.wait()
        for page in pages:
            ctypes.memset(b.page(page) + page % PAGE_SIZE, 1, 1)

    threads = [threading.Thread(target=writer, args=(plan,)) for plan in plans]
    for thread in threads:
        thread.start()
    start.wait()
    reported: list[int] = []
    n_harvests = 0
    while any(thread.is_alive() for thread in threads):
        reported += harvested_pages(ww.harvest(b.addr, b.length_bytes), b.addr)
        n_harvests += 1
    for thread in threads:
        thread.join()
    reported += harvested_pages(ww.harvest(b.addr, b.length_bytes), b.addr)
    assert set(reported) == {p for plan in plans for p in plan}
    assert n_harvests > 0


def test_one_writewatch_shared_by_a_thread_pool(ww: WriteWatch, make_buffer: MakeBuffer) -> None:
    # Each thread writes to and queries its own watch of one shared WriteWatch; the scan
    # buffer is shared, so the answers are exact only if calls are serialised correctly.
    n_threads, n_pages = 4, 256
    buffers: list[Buffer] = [make_buffer(n_pages) for _ in range(n_threads)]
    for b in buffers:
        ww.watch(b.addr, b.length_bytes)
    failures: list[str] = []

    def worker(b: Buffer, seed: int) -> None:
        rng = random.Random(seed)
        for round_index in range(150):
            pages = sorted(rng.sample(range(n_pages), rng.randint(1, 40)))
            b.write(*pages)
            if round_index % 2:
                got = [
                    (a - b.addr) // PAGE_SIZE
                    for a in ww.get_write_watch(b.addr, b.length_bytes, max_count=n_pages, reset=True).addresses
                ]
            else:
                got = harvested_pages(ww.harvest(b.addr, b.length_bytes), b.addr)
            if got != pages:
                failures.append(f"thread {seed} round {round_index}: {got} != {pages}")
                return

    threads = [threading.Thread(target=worker, args=(b, i)) for i, b in enumerate(buffers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# --- transparent huge pages -----------------------------------------------------------------


def _thp_available() -> bool:
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _thp_available(), reason="transparent huge pages are disabled")
@pytest.mark.parametrize("no_huge_pages", [False, True])
@pytest.mark.parametrize("populated", [True, False], ids=["populated-huge", "unpopulated"])
def test_thp_memory_reports_4k_pages(
    ww: WriteWatch, make_buffer: MakeBuffer, no_huge_pages: bool, populated: bool
) -> None:
    n_huge = 2
    raw: Buffer = make_buffer((n_huge + 1) * HPAGE_PMD_BYTES // PAGE_SIZE)
    addr = -(-raw.addr // HPAGE_PMD_BYTES) * HPAGE_PMD_BYTES
    length = n_huge * HPAGE_PMD_BYTES
    assert _libc.madvise(addr, length, MADV_HUGEPAGE) == 0
    if populated:
        ctypes.memset(addr, 1, length)
        with PagemapScanner() as scanner:
            huge = scanner.scan(addr, addr + length, category_mask=Category.HUGE, return_mask=Category.HUGE)
        if huge.n_pages != length // PAGE_SIZE:
            pytest.skip("the kernel did not back the MADV_HUGEPAGE area with PMD THPs")
    ww.watch(addr, length, no_huge_pages=no_huge_pages)
    assert ww.get_write_watch(addr, length, max_count=4096).addresses == []
    ctypes.memset(addr + 700 * PAGE_SIZE + 5, 2, 1)
    ctypes.memset(addr + 3 * PAGE_SIZE, 2, 1)
    expected = [addr + 3 * PAGE_SIZE, addr + 700 * PAGE_SIZE]
    assert ww.get_write_watch(addr, length, max_count=4096).addresses == expected
    assert ww.harvest(addr, length).tolist() == [[a, a + PAGE_SIZE] for a in expected]
    assert ww.get_write_watch(addr, length, max_count=4096).addresses == []


# --- property: random writes and calls against a model of Win32 -----------------------------

MODEL_PAGES = 48


class Win32Model:
    """Pure-Python write watch: the set of pages written since their last reset."""

    def __init__(self) -> None:
        self.dirty: set[int] = set()

    def write(self, offset: int, length: int) -> None:
        self.dirty.update(range(offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE + 1))

    def get(self, first: int, end: int, max_count: int, reset: bool) -> list[int]:
        hits = sorted(p for p in self.dirty if first <= p < end)[:max_count]
        if reset:
            self.dirty.difference_update(hits)
        return hits

    def reset(self, first: int, end: int) -> None:
        self.dirty.difference_update(range(first, end))


def _span(offset: int, length: int) -> tuple[int, int]:
    return offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE)


_offsets = st.integers(0, MODEL_PAGES * PAGE_SIZE - 1)
_operations = st.one_of(
    st.tuples(st.just("write"), _offsets, st.integers(1, 3 * PAGE_SIZE)),
    st.tuples(st.just("read"), _offsets, st.just(1)),
    st.tuples(st.just("get"), _offsets, st.integers(1, 6 * PAGE_SIZE), st.integers(1, 12), st.booleans()),
    st.tuples(st.just("reset"), _offsets, st.integers(1, 6 * PAGE_SIZE)),
    st.tuples(st.just("harvest"), _offsets, st.integers(1, 6 * PAGE_SIZE)),
)


@pytest.fixture(scope="module")
def model_target() -> Iterator[tuple[WriteWatch, Buffer]]:
    try:
        watch = WriteWatch()
    except KernelError as exc:
        pytest.skip(f"async write-protect userfaultfd is unavailable: {exc}")
    b = _map(MODEL_PAGES * PAGE_SIZE)
    with watch:
        watch.watch(b.addr, b.length_bytes)
        yield watch, b
    b.mapping.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=st.lists(_operations, max_size=30))
def test_matches_win32_model(model_target: tuple[WriteWatch, Buffer], operations: list[tuple]) -> None:  # type: ignore[type-arg]
    ww, b = model_target
    ww.reset_write_watch(b.addr, b.length_bytes)
    model = Win32Model()
    for op in operations:
        kind, offset = op[0], op[1]
        length = min(op[2], b.length_bytes - offset)
        first, end = _span(offset, length)
        if kind == "write":
            ctypes.memset(b.addr + offset, 0x77, length)
            model.write(offset, length)
        elif kind == "read":
            b.mapping[offset]  # a read fault must not count as a write
        elif kind == "get":
            max_count, reset = op[3], op[4]
            got = ww.get_write_watch(b.addr + offset, length, max_count=max_count, reset=reset).addresses
            assert [(a - b.addr) // PAGE_SIZE for a in got] == model.get(first, end, max_count, reset), op
        elif kind == "reset":
            ww.reset_write_watch(b.addr + offset, length)
            model.reset(first, end)
        else:
            regions = ww.harvest(b.addr + offset, length)
            assert (regions[1:, 0] > regions[:-1, 1]).all(), "harvest regions must be merged"
            got_pages = harvested_pages(regions, b.addr)
            assert got_pages == model.get(first, end, MODEL_PAGES, reset=True), op
    assert written(ww, b, max_count=MODEL_PAGES) == sorted(model.dirty)
