"""Real-memory helpers for the kernel conformance suite, imported by its tests.

Memory is mapped with libc through ctypes, so each test knows exact addresses and can write
single bytes natively (ctypes calls release the GIL). The fixtures that hand these out (and
undo them) are in ``conftest.py``.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from writewatchd.kernel import PAGE_SIZE, Category, PagemapScanner, ScanFlag, Userfaultfd
from writewatchd.kernel._libc import ioctl
from writewatchd.kernel.pagemap import PAGEMAP_SCAN, PmScanArg

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mmap.restype = ctypes.c_void_p
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
libc.mremap.restype = ctypes.c_void_p
libc.memfd_create.argtypes = [ctypes.c_char_p, ctypes.c_uint]
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmat.restype = ctypes.c_void_p
libc.shmdt.argtypes = [ctypes.c_void_p]
libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]

MAP_FAILED = ctypes.c_void_p(-1).value
PROT_NONE = 0
MAP_FIXED = 0x10
MAP_HUGETLB = 0x40000
MAP_NORESERVE = 0x4000
MFD_CLOEXEC = 1
MFD_HUGETLB = 4
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
IPC_PRIVATE = 0
IPC_CREAT = 0o1000
IPC_RMID = 0
SHM_HUGETLB = 0o4000
HPAGE_PMD_BYTES = 2 << 20
HPAGE_PMD_PAGES = HPAGE_PMD_BYTES // PAGE_SIZE

WRITTEN = int(Category.WRITTEN)
WP_SCAN = ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC

#: Memory kinds every base test runs on (hugetlb kinds need the pool fixture).
KINDS = (
    "anon",
    "anon_large",
    "thp",
    "shmem",
    "memfd",
    "memfd_private",
    "file_private",
    "hugetlb",
    "hugetlb_memfd",
    "hugetlb_shm",
)
HUGETLB_KINDS = frozenset({"hugetlb", "hugetlb_memfd", "hugetlb_shm"})


def oserror(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def raw_mmap(length_bytes: int, prot: int, flags: int, fd: int = -1, addr: int = 0) -> int:
    """mmap(2) returning the address; raises OSError."""
    result = libc.mmap(addr or None, length_bytes, prot, flags, fd, 0)
    if result in (None, MAP_FAILED):
        raise oserror("mmap")
    return int(result)


def madvise(addr: int, length_bytes: int, advice: int) -> None:
    if libc.madvise(addr, length_bytes, advice) != 0:
        raise oserror(f"madvise({advice})")


def mprotect(addr: int, length_bytes: int, prot: int) -> None:
    if libc.mprotect(addr, length_bytes, prot) != 0:
        raise oserror("mprotect")


def munmap(addr: int, length_bytes: int) -> None:
    if libc.munmap(addr, length_bytes) != 0:
        raise oserror("munmap")


def page_set(regions: npt.NDArray[np.uint64], base: int) -> set[int]:
    """The 4 KiB page indices (relative to ``base``) covered by ``[start, end, ...]`` rows."""
    pages: set[int] = set()
    for row in regions:
        first = (int(row[0]) - base) // PAGE_SIZE
        last = (int(row[1]) - base) // PAGE_SIZE
        pages.update(range(first, last))
    return pages


def region_list(regions: npt.NDArray[np.uint64], base: int) -> list[tuple[int, int]]:
    """Rows as ``(first_page, end_page)`` relative to ``base``."""
    return [((int(r[0]) - base) // PAGE_SIZE, (int(r[1]) - base) // PAGE_SIZE) for r in regions]


@dataclass
class Mem:
    """One mapping under test. ``unit_pages`` is how many 4 KiB pages one write dirties."""

    kind: str
    addr: int
    length_bytes: int
    unit_pages: int = 1
    _cleanups: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def end(self) -> int:
        return self.addr + self.length_bytes

    @property
    def n_pages(self) -> int:
        return self.length_bytes // PAGE_SIZE

    def page(self, index: int) -> int:
        return self.addr + index * PAGE_SIZE

    def write(self, indices: Iterable[int], value: int = 0x5A) -> None:
        """Store one byte into each given 4 KiB page (a native store, GIL released)."""
        for index in indices:
            ctypes.memset(self.page(index), value, 1)

    def write_all(self, value: int = 0x5A) -> None:
        ctypes.memset(self.addr, value, self.length_bytes)

    def read(self, index: int) -> int:
        return ctypes.c_ubyte.from_address(self.page(index)).value

    def read_all(self) -> None:
        """Fault every page in for reading (maps the zero page on anon memory)."""
        for index in range(self.n_pages):
            self.read(index)

    def dirtied(self, indices: Iterable[int]) -> set[int]:
        """The pages that writing ``indices`` marks written: whole huge pages on hugetlb."""
        unit = self.unit_pages
        return {p for i in indices for p in range(i - i % unit, i - i % unit + unit)}

    def close(self) -> None:
        while self._cleanups:
            self._cleanups.pop()()


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def map_thp_area(n_bytes: int) -> tuple[int, Callable[[], None]]:
    """A PMD-aligned anonymous area with MADV_HUGEPAGE; returns (addr, unmap)."""
    reserve = n_bytes + HPAGE_PMD_BYTES
    raw = raw_mmap(reserve, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = _align_up(raw, HPAGE_PMD_BYTES)
    madvise(addr, n_bytes, MADV_HUGEPAGE)
    return addr, lambda: munmap(raw, reserve)


def huge_pages(scanner: PagemapScanner, start: int, end: int) -> int:
    """How many 4 KiB pages of the range are mapped huge (PMD THP or hugetlb)."""
    result = scanner.scan(start, end, category_mask=Category.HUGE | Category.PRESENT, return_mask=Category.HUGE)
    return result.n_pages


def thp_enabled() -> bool:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in text


class MemFactory:
    """Creates mappings of each kind and unmaps them all at teardown."""

    def __init__(self, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self._tmp_path = tmp_path
        self._request = request
        self._made: list[Mem] = []
        self._n_files = 0

    def close(self) -> None:
        while self._made:
            self._made.pop().close()

    def __call__(self, kind: str, n_pages: int = 10) -> Mem:
        if kind in HUGETLB_KINDS:
            self._request.getfixturevalue("hugetlb_pool")
        make: Callable[[int], Mem] = getattr(self, f"_{kind}")
        mem = make(n_pages)
        self._made.append(mem)
        return mem

    def _anon(self, n_pages: int) -> Mem:
        length = n_pages * PAGE_SIZE
        addr = raw_mmap(length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return Mem("anon", addr, length, 1, [lambda: munmap(addr, length)])

    def _anon_large(self, n_pages: int) -> Mem:
        mem = self._anon(max(n_pages, 5120))
        mem.kind = "anon_large"
        return mem

    def _thp(self, n_pages: int) -> Mem:
        if not thp_enabled():
            pytest.skip("transparent huge pages are disabled (enabled=never)")
        length = _align_up(max(n_pages, HPAGE_PMD_PAGES) * PAGE_SIZE, HPAGE_PMD_BYTES)
        addr, unmap = map_thp_area(length)
        mem = Mem("thp", addr, length, 1, [unmap])
        mem.write_all()
        with PagemapScanner() as scanner:
            if huge_pages(scanner, addr, addr + length) != length // PAGE_SIZE:
                mem.close()
                pytest.skip("the kernel did not back the MADV_HUGEPAGE area with PMD THPs")
        return mem

    def _shared_anon(self, n_pages: int) -> Mem:
        length = n_pages * PAGE_SIZE
        addr = raw_mmap(length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        return Mem("shmem", addr, length, 1, [lambda: munmap(addr, length)])

    _shmem = _shared_anon

    def _memfd_map(self, kind: str, n_pages: int, map_flags: int, memfd_flags: int = 0, unit_pages: int = 1) -> Mem:
        fd = libc.memfd_create(f"wwconf-{kind}".encode(), MFD_CLOEXEC | memfd_flags)
        if fd < 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL and memfd_flags:
                pytest.skip(f"memfd_create({kind}) is not supported: {os.strerror(err)}")
            raise oserror("memfd_create")
        length = n_pages * PAGE_SIZE
        try:
            os.ftruncate(fd, length)
            addr = raw_mmap(length, mmap.PROT_READ | mmap.PROT_WRITE, map_flags, fd)
        finally:
            os.close(fd)
        return Mem(kind, addr, length, unit_pages, [lambda: munmap(addr, length)])

    def _memfd(self, n_pages: int) -> Mem:
        return self._memfd_map("memfd", n_pages, mmap.MAP_SHARED)

    def _memfd_private(self, n_pages: int) -> Mem:
        return self._memfd_map("memfd_private", n_pages, mmap.MAP_PRIVATE)

    def _file_private(self, n_pages: int) -> Mem:
        self._n_files += 1
        path = self._tmp_path / f"private-{self._n_files}.bin"
        length = n_pages * PAGE_SIZE
        path.write_bytes(b"\x01" * length)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            addr = raw_mmap(length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd)
        finally:
            os.close(fd)
        return Mem("file_private", addr, length, 1, [lambda: munmap(addr, length), path.unlink])

    def _hugetlb(self, n_pages: int) -> Mem:
        length = _align_up(n_pages * PAGE_SIZE, HPAGE_PMD_BYTES)
        addr = raw_mmap(length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB)
        return Mem("hugetlb", addr, length, HPAGE_PMD_PAGES, [lambda: munmap(addr, length)])

    def _hugetlb_memfd(self, n_pages: int) -> Mem:
        n_pages = _align_up(n_pages, HPAGE_PMD_PAGES)
        return self._memfd_map("hugetlb_memfd", n_pages, mmap.MAP_SHARED, MFD_HUGETLB, HPAGE_PMD_PAGES)

    def _hugetlb_shm(self, n_pages: int) -> Mem:
        length = _align_up(n_pages * PAGE_SIZE, HPAGE_PMD_BYTES)
        shmid = libc.shmget(IPC_PRIVATE, length, IPC_CREAT | SHM_HUGETLB | 0o600)
        if shmid < 0:
            raise oserror("shmget(SHM_HUGETLB)")
        addr = libc.shmat(shmid, None, 0)
        # Marked for removal at once: the segment disappears with the last detach, even on a crash.
        libc.shmctl(shmid, IPC_RMID, None)
        if addr in (None, MAP_FAILED):
            raise oserror("shmat")
        return Mem("hugetlb_shm", int(addr), length, HPAGE_PMD_PAGES, [lambda: libc.shmdt(addr)])


@dataclass
class Tracked:
    """A mapping registered for async write-protect, plus the scanner to read it with."""

    mem: Mem
    uffd: Userfaultfd
    scanner: PagemapScanner

    def protect(self) -> None:
        self.uffd.write_protect(self.mem.addr, self.mem.length_bytes)

    def written(self, start_page: int = 0, end_page: int | None = None, **masks: int) -> set[int]:
        """Pages reading WRITTEN (read-only scan; fast path unless other masks are given)."""
        end_page = self.mem.n_pages if end_page is None else end_page
        masks.setdefault("category_mask", WRITTEN)
        masks.setdefault("return_mask", WRITTEN)
        result = self.scanner.scan(self.mem.page(start_page), self.mem.page(end_page), **masks)
        return page_set(result.regions, self.mem.addr)

    def harvest(self) -> set[int]:
        return page_set(self.scanner.harvest(self.mem.addr, self.mem.end), self.mem.addr)

    def regions(self, **masks: int) -> list[tuple[int, int]]:
        masks.setdefault("category_mask", WRITTEN)
        masks.setdefault("return_mask", WRITTEN)
        result = self.scanner.scan(self.mem.addr, self.mem.end, **masks)
        return region_list(result.regions, self.mem.addr)


def raw_pagemap_scan(fd: int, **fields: int) -> tuple[int, PmScanArg]:
    """One PAGEMAP_SCAN with every struct field under the test's control; returns (result or -errno, arg)."""
    arg = PmScanArg(size=ctypes.sizeof(PmScanArg))
    for name, value in fields.items():
        setattr(arg, name, value)
    return ioctl(fd, PAGEMAP_SCAN, ctypes.byref(arg)), arg
