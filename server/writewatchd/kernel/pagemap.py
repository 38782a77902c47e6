"""PAGEMAP_SCAN (``ioctl`` on ``/proc/PID/pagemap``, Linux >= 6.7).

One :class:`PagemapScanner` per target process holds the open pagemap fd, a reused output
buffer and a reused argument struct. :meth:`PagemapScanner.scan` walks a whole range by the
safe completion rule (never trusting ``walk_end`` alone, see docs/kernel.md §5.1);
:meth:`PagemapScanner.harvest` is the hot path: report the written pages and re-protect
exactly those, in one kernel walk per buffer-full.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import numpy.typing as npt

from .._exceptions import FeatureUnavailable, InvalidRange, NotRegistered, ProcessGone, UsageError
from ._fd import OwnedFd
from ._libc import ioctl, raise_errno

__all__ = [
    "ALL_CATEGORIES",
    "PAGEMAP_SCAN",
    "PAGE_SIZE",
    "Category",
    "PagemapScanner",
    "PmScanArg",
    "RawScan",
    "RowsToRegions",
    "ScanFlag",
    "ScanResult",
]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1


class Category(enum.IntFlag):
    """``PAGE_IS_*`` category bits of a page (``linux/fs.h``)."""

    WPALLOWED = 1 << 0
    WRITTEN = 1 << 1
    FILE = 1 << 2
    PRESENT = 1 << 3
    SWAPPED = 1 << 4
    PFNZERO = 1 << 5
    HUGE = 1 << 6
    SOFT_DIRTY = 1 << 7
    GUARD = 1 << 8


ALL_CATEGORIES = Category(sum(c.value for c in Category))


class ScanFlag(enum.IntFlag):
    """``PM_SCAN_*`` flags."""

    WP_MATCHING = 1 << 0
    CHECK_WPASYNC = 1 << 1


class PmScanArg(ctypes.Structure):
    """``struct pm_scan_arg``: 12 little-endian u64 fields, 96 bytes."""

    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("walk_end", ctypes.c_uint64),
        ("vec", ctypes.c_uint64),
        ("vec_len", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("category_inverted", ctypes.c_uint64),
        ("category_mask", ctypes.c_uint64),
        ("category_anyof_mask", ctypes.c_uint64),
        ("return_mask", ctypes.c_uint64),
    ]


assert ctypes.sizeof(PmScanArg) == 96

# _IOWR('f', 16, struct pm_scan_arg)
PAGEMAP_SCAN = (3 << 30) | (ctypes.sizeof(PmScanArg) << 16) | (ord("f") << 8) | 16

_REGION_FIELDS = 3  # struct page_region {start, end, categories}
_REGION_BYTES = _REGION_FIELDS * 8
# The (start, end) pair of a page_region, as one opaque 16-byte item. numpy copies a
# strided 1-D array of 16-byte items with a tight loop, but the equivalent ``[:, :2]``
# slice of the uint64 buffer row by row, about 10x slower (240 vs 16 us for 31 000 rows).
_START_END = np.dtype("V16")
# Viewing a contiguous array of those items as this subarray dtype gives the (n, 2) uint64
# result in one step.
_START_END_AS_UINT64 = np.dtype((np.uint64, (2,)))
_DEFAULT_CAPACITY_REGIONS = 1 << 16
_EMPTY = np.empty((0, 2), dtype=np.uint64)
_EMPTY.flags.writeable = False
HARVEST_FLAGS = ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC

RowsToRegions = Callable[[npt.NDArray[np.uint64], int], npt.NDArray[np.uint64] | None]
"""Makes a harvest's ``(n, 2)`` result from the scan buffer and its row count (None: the scanner's own copy)."""


@dataclass(frozen=True, slots=True)
class RawScan:
    """What one PAGEMAP_SCAN ioctl returned: ``n_regions`` rows of the buffer, and ``walk_end``."""

    n_regions: int
    walk_end: int


@dataclass(frozen=True, slots=True)
class ScanResult:
    """Regions of a whole-range scan.

    ``regions`` is an ``(n, 3)`` uint64 array of ``[start, end, categories]`` rows, sorted,
    byte addresses with exclusive ends. ``complete`` is false only when ``max_pages`` stopped
    the walk, and then ``resume_at`` is where a next scan should start.
    """

    regions: npt.NDArray[np.uint64]
    complete: bool
    resume_at: int

    @property
    def n_pages(self) -> int:
        """Number of pages inside the reported regions."""
        return int(((self.regions[:, 1] - self.regions[:, 0]) >> PAGE_SHIFT).sum())


def _check_range(start: int, end: int) -> None:
    if start % PAGE_SIZE:
        raise InvalidRange(f"start 0x{start:x} is not aligned to the {PAGE_SIZE}-byte page size")
    if end < start:
        raise InvalidRange(f"end 0x{end:x} is below start 0x{start:x}")


def _check_categories(**masks: int) -> None:
    for name, mask in masks.items():
        unknown = mask & ~int(ALL_CATEGORIES)
        if unknown:
            raise UsageError(f"{name} has bits 0x{unknown:x} that are not PAGE_IS_* categories")


class PagemapScanner(OwnedFd):
    """An open ``/proc/PID/pagemap`` with a reused output buffer.

    Not thread-safe: one scanner serves one thread at a time (the buffer is shared).
    The open fd pins the target's mm, so a recycled pid is never scanned by mistake: once
    the target exits, every scan raises :class:`ProcessGone`.

    ``rows_to_regions``, when given, copies :meth:`harvest`'s rows out of the buffer instead
    of the scanner: a caller that post-processes every harvest can do it in the same pass,
    while the rows are still in the cache (tracking's compiled region summary does).
    With ``max_capacity_regions`` above ``capacity_regions``, a harvest that fills the buffer
    grows it (to the next power of two above the regions it found, at most that), so that a
    target writing that scattered is harvested in one ioctl and one copy from then on.
    """

    def __init__(
        self,
        pid: int | None = None,
        *,
        capacity_regions: int = _DEFAULT_CAPACITY_REGIONS,
        max_capacity_regions: int = 0,
        rows_to_regions: RowsToRegions | None = None,
    ) -> None:
        if capacity_regions < 1:
            raise UsageError(f"capacity_regions must be >= 1, got {capacity_regions}")
        self.pid = os.getpid() if pid is None else pid
        path = "/proc/self/pagemap" if pid is None else f"/proc/{pid}/pagemap"
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise_errno(exc.errno or errno.EIO, f"open {path}", hint="PTRACE_MODE_READ access to the target is needed")
        self._max_capacity_regions = max(capacity_regions, max_capacity_regions)
        self._rows_to_regions = rows_to_regions
        self._arg = PmScanArg(size=ctypes.sizeof(PmScanArg))
        self._arg_ref = ctypes.byref(self._arg)
        # harvest() has its own argument struct, filled once: per call it only sets the range.
        self._harvest_arg = PmScanArg(
            size=ctypes.sizeof(PmScanArg),
            flags=HARVEST_FLAGS,
            category_mask=Category.WRITTEN,
            return_mask=Category.WRITTEN,
        )
        self._harvest_arg_ref = ctypes.byref(self._harvest_arg)
        self._allocate(capacity_regions)

    def _allocate(self, capacity_regions: int) -> None:
        """A new output buffer of ``capacity_regions`` rows (what it held is dropped)."""
        # Unzeroed: only the rows an ioctl fills are ever read. Zeroing (calloc) would touch all
        # 1.5 MiB of every session's buffer once glibc serves it from a thread's arena (as it
        # does after such buffers have been freed), and 200 sessions would hold 300 MiB.
        self._buffer = np.empty((capacity_regions, _REGION_FIELDS), dtype=np.uint64)
        self._capacity_regions = capacity_regions
        self._buffer_address = int(self._buffer.ctypes.data)
        self._start_end_pairs = np.ndarray(
            (capacity_regions,), dtype=_START_END, buffer=self._buffer, strides=(_REGION_BYTES,)
        )
        self._harvest_arg.vec = self._buffer_address
        self._harvest_arg.vec_len = capacity_regions

    @property
    def capacity_regions(self) -> int:
        """How many regions one ioctl can return."""
        return self._capacity_regions

    @property
    def buffer(self) -> npt.NDArray[np.uint64]:
        """The reused ``(capacity, 3)`` output buffer; valid until the next scan."""
        return self._buffer

    def ioctl(
        self,
        start: int,
        end: int,
        *,
        flags: ScanFlag | int = 0,
        category_mask: int = 0,
        category_anyof_mask: int = 0,
        category_inverted: int = 0,
        return_mask: int = 0,
        max_pages: int = 0,
        vec_len: int | None = None,
    ) -> RawScan:
        """One PAGEMAP_SCAN ioctl into the buffer, exactly as the kernel defines it.

        ``vec_len`` defaults to the buffer capacity; 0 passes no output buffer at all
        (the kernel's exclusive write-protect path when ``WP_MATCHING`` is set).
        """
        n_slots = self.capacity_regions if vec_len is None else min(vec_len, self.capacity_regions)
        arg = self._arg
        arg.flags = int(flags)
        arg.start = start
        arg.end = end
        arg.walk_end = 0
        arg.vec = self._buffer_address if n_slots else 0
        arg.vec_len = n_slots
        arg.max_pages = max_pages
        arg.category_inverted = category_inverted
        arg.category_mask = category_mask
        arg.category_anyof_mask = category_anyof_mask
        arg.return_mask = return_mask
        result = ioctl(self._fd, PAGEMAP_SCAN, self._arg_ref)
        if result < 0:
            self._raise(-result, start, end, flags, category_mask, category_anyof_mask, category_inverted, return_mask)
        return RawScan(result, int(arg.walk_end))

    def scan(
        self,
        start: int,
        end: int,
        *,
        flags: ScanFlag | int = 0,
        category_mask: int = 0,
        category_anyof_mask: int = 0,
        category_inverted: int = 0,
        return_mask: int = 0,
        max_pages: int = 0,
    ) -> ScanResult:
        """Scan all of ``[start, end)`` (or up to ``max_pages`` pages) by the safe completion rule."""
        _check_range(start, end)
        _check_categories(
            category_mask=category_mask,
            category_anyof_mask=category_anyof_mask,
            category_inverted=category_inverted,
            return_mask=return_mask,
        )
        chunks: list[npt.NDArray[np.uint64]] = []
        pages_left = max_pages
        position = start
        while position < end:
            raw = self.ioctl(
                position,
                end,
                flags=flags,
                category_mask=category_mask,
                category_anyof_mask=category_anyof_mask,
                category_inverted=category_inverted,
                return_mask=return_mask,
                max_pages=pages_left,
            )
            got = self._buffer[: raw.n_regions].copy()
            if raw.n_regions:
                chunks.append(got)
            if max_pages:
                pages_left -= int(((got[:, 1] - got[:, 0]) >> PAGE_SHIFT).sum())
                if pages_left <= 0:
                    resume_at = max(raw.walk_end, int(got[-1, 1])) if raw.n_regions else raw.walk_end
                    return ScanResult(_join(chunks, 3), resume_at >= end, min(resume_at, end))
            if raw.n_regions < self.capacity_regions:
                break
            position = max(raw.walk_end, int(got[-1, 1]))
        return ScanResult(_join(chunks, 3), True, end)

    def harvest(self, start: int, end: int) -> npt.NDArray[np.uint64]:
        """Report the pages written since the last harvest and re-protect exactly them.

        Returns a sorted ``(n, 2)`` uint64 array of ``[start, end)`` byte addresses. Every
        page of the range must be registered for async write-protect, else
        :class:`NotRegistered` (after which the caller must treat the range as written:
        the kernel may already have re-protected part of it, docs/kernel.md §5.2).
        """
        if start % PAGE_SIZE:
            _check_range(start, end)
        capacity = self._capacity_regions
        arg = self._harvest_arg
        chunks: list[npt.NDArray[np.uint64]] = []
        position = start
        while True:
            # The hot path: the same call as self.ioctl(position, end, flags=HARVEST_FLAGS,
            # category_mask=WRITTEN, return_mask=WRITTEN), without re-filling nine fields.
            # walk_end needs no reset: the kernel zeroes it on entry (docs/kernel.md §1.4).
            arg.start = position
            arg.end = end
            n = ioctl(self._fd, PAGEMAP_SCAN, self._harvest_arg_ref)
            if n < 0:
                written = int(Category.WRITTEN)
                self._raise(-n, position, end, HARVEST_FLAGS, written, 0, 0, written)
            if n < capacity:
                if not chunks:
                    return self._starts_ends(n) if n else _EMPTY
                chunks.append(self._starts_ends(n))
                return self._joined(chunks)
            chunks.append(self._starts_ends(n))
            position = max(int(arg.walk_end), int(self._buffer[-1, 1]))
            if position >= end:
                return self._joined(chunks)

    def _joined(self, chunks: list[npt.NDArray[np.uint64]]) -> npt.NDArray[np.uint64]:
        """The regions of a harvest that filled the buffer, which grows if it may."""
        regions = _join(chunks)
        if self._capacity_regions < self._max_capacity_regions:
            self._allocate(min(self._max_capacity_regions, 1 << len(regions).bit_length()))
        return regions

    def _starts_ends(self, n_regions: int) -> npt.NDArray[np.uint64]:
        """A fresh contiguous ``(n_regions, 2)`` copy of the buffer's first start/end columns."""
        if self._rows_to_regions is not None:
            regions = self._rows_to_regions(self._buffer, n_regions)
            if regions is not None:
                return regions
        # Each numpy call costs a few microseconds with the cold caches a scan leaves behind,
        # so: slice, copy, view, and nothing else.
        pairs: npt.NDArray[np.uint64] = self._start_end_pairs[:n_regions].copy().view(_START_END_AS_UINT64)
        return pairs

    def _raise(self, err: int, start: int, end: int, flags: int, *masks: int) -> NoReturn:
        what = f"PAGEMAP_SCAN of pid {self.pid} [0x{start:x}, 0x{end:x})"
        if err == errno.EINVAL:
            unknown_masks = 0
            for mask in masks:
                unknown_masks |= mask
            if start % PAGE_SIZE:
                raise InvalidRange(f"{what}: start is not page aligned")
            if int(flags) & ~int(ScanFlag.WP_MATCHING | ScanFlag.CHECK_WPASYNC):
                raise UsageError(f"{what}: unknown flag bits 0x{int(flags) & ~3:x}")
            raise FeatureUnavailable(
                err, f"{what}: this kernel rejects the category bits 0x{unknown_masks:x} or the argument struct"
            )
        if err == errno.EFAULT:
            raise InvalidRange(f"{what}: range is outside the user address space")
        raise_errno(
            err,
            what,
            classes={errno.EPERM: NotRegistered, errno.ESRCH: ProcessGone},
            hints={errno.EPERM: "CHECK_WPASYNC met memory without async write-protect"},
        )


def _join(chunks: list[npt.NDArray[np.uint64]], n_columns: int = 2) -> npt.NDArray[np.uint64]:
    """Concatenate scan chunks of ``n_columns`` columns, merging a region split across two ioctls."""
    if not chunks:
        return np.empty((0, n_columns), dtype=np.uint64)
    if len(chunks) == 1:
        return chunks[0]
    joined = np.concatenate(chunks)
    # A region can continue across an ioctl boundary; merge rows whose end meets the next
    # start when their categories (if any) agree.
    touching = joined[1:, 0] == joined[:-1, 1]
    if joined.shape[1] == 3:
        touching &= joined[1:, 2] == joined[:-1, 2]
    if not touching.any():
        return joined
    starts_group = np.concatenate(([True], ~touching))
    group_starts = np.flatnonzero(starts_group)
    group_ends = np.concatenate((group_starts[1:], [len(joined)])) - 1
    merged = joined[group_starts].copy()
    merged[:, 1] = joined[group_ends, 1]
    return merged
