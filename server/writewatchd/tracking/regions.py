"""Sets of pages as sorted, merged ``(n, 2)`` uint64 arrays of ``[start, end)`` byte addresses.

Every operation is vectorised with numpy: no per-region Python loop on a hot path.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from ..kernel.pagemap import PAGE_SIZE

__all__ = ["EMPTY", "RegionArray", "RegionSet", "as_regions", "merge", "n_bytes", "n_pages", "page_addresses"]

RegionArray = npt.NDArray[np.uint64]

_U64_MAX = (1 << 64) - 1

EMPTY: RegionArray = np.empty((0, 2), dtype=np.uint64)
EMPTY.flags.writeable = False


def as_regions(ranges: Iterable[tuple[int, int]] | RegionArray) -> RegionArray:
    """An ``(n, 2)`` uint64 array from ``(start, end)`` pairs (not yet sorted or merged)."""
    array = np.asarray(ranges if isinstance(ranges, np.ndarray) else list(ranges), dtype=np.uint64)
    return array.reshape(-1, 2)


def merge(regions: RegionArray) -> RegionArray:
    """Sort, drop empty rows, and merge overlapping or touching regions."""
    if len(regions) == 0:
        return EMPTY
    regions = regions[regions[:, 1] > regions[:, 0]]
    if len(regions) <= 1:
        return regions
    if not (np.all(regions[1:, 0] > regions[:-1, 1])):
        regions = regions[np.argsort(regions[:, 0], kind="stable")]
    ends = np.maximum.accumulate(regions[:, 1])
    # A region starts a new group when it begins strictly after everything before it ends.
    new_group = np.empty(len(regions), dtype=bool)
    new_group[0] = True
    np.greater(regions[1:, 0], ends[:-1], out=new_group[1:])
    if new_group.all():
        return regions
    firsts = np.flatnonzero(new_group)
    lasts = np.append(firsts[1:], len(regions)) - 1
    return np.column_stack((regions[firsts, 0], ends[lasts]))


def n_bytes(regions: RegionArray) -> int:
    """Total bytes covered by merged ``regions``."""
    # The sum of the ends minus the sum of the starts (uint64 sums wrap, their difference
    # does not): two plain reductions and no temporary, as the daemon counts right after a
    # scan, when every extra numpy call runs with cold caches.
    flat = regions.reshape(-1)
    return (int(np.add.reduce(flat[1::2])) - int(np.add.reduce(flat[0::2]))) & _U64_MAX


def n_pages(regions: RegionArray) -> int:
    """Total pages covered by merged, page-aligned ``regions``."""
    return n_bytes(regions) // PAGE_SIZE


def _combine(a: RegionArray, b: RegionArray, keep_a_only: bool) -> RegionArray:
    """Elementary-interval sweep over merged ``a`` and ``b``: ``a - b`` or ``a & b``."""
    if len(a) == 0 or len(b) == 0:
        return a if keep_a_only else EMPTY
    points = np.unique(np.concatenate((a.ravel(), b.ravel())))
    lefts = points[:-1]
    # Inside a merged set when an odd number of its boundaries are <= the point.
    in_a = (np.searchsorted(a.ravel(), lefts, side="right") & 1).astype(bool)
    in_b = (np.searchsorted(b.ravel(), lefts, side="right") & 1).astype(bool)
    keep = in_a & ~in_b if keep_a_only else in_a & in_b
    return merge(np.column_stack((lefts[keep], points[1:][keep])))


class RegionSet:
    """A mutable set of pages; the array is always sorted and merged."""

    __slots__ = ("_regions",)
    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self, regions: RegionArray | Iterable[tuple[int, int]] = EMPTY) -> None:
        self._regions = merge(as_regions(regions))

    @property
    def regions(self) -> RegionArray:
        """The sorted, merged ``(n, 2)`` array (do not modify)."""
        return self._regions

    @property
    def n_bytes(self) -> int:
        """Total bytes in the set."""
        return n_bytes(self._regions)

    @property
    def n_pages(self) -> int:
        """Total pages in the set."""
        return n_pages(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    def __bool__(self) -> bool:
        return len(self._regions) > 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RegionSet):
            return NotImplemented
        return np.array_equal(self._regions, other._regions)

    def __repr__(self) -> str:
        return f"RegionSet({len(self._regions)} regions, {self.n_bytes} bytes)"

    def add(self, regions: RegionArray) -> None:
        """Union ``regions`` (any order) into the set."""
        if len(regions) == 0:
            return
        if len(self._regions) == 0:
            self._regions = merge(regions)
            return
        self._regions = merge(np.concatenate((self._regions, regions)))

    def discard(self, regions: RegionArray) -> None:
        """Remove ``regions`` (merged) from the set."""
        self._regions = _combine(self._regions, merge(regions), keep_a_only=True)

    def clip(self, start: int, end: int) -> RegionArray:
        """The part of the set inside ``[start, end)``, as a new array."""
        return _combine(self._regions, np.array([[start, end]], dtype=np.uint64), keep_a_only=False)

    def intersection(self, regions: RegionArray) -> RegionArray:
        """The part of the set inside merged ``regions``."""
        return _combine(self._regions, merge(regions), keep_a_only=False)

    def clear(self) -> None:
        """Remove everything."""
        self._regions = EMPTY


def page_addresses(regions: RegionArray, page_size_bytes: int) -> RegionArray:
    """The address of every page inside ``regions``, ascending (a 1-D uint64 array)."""
    if len(regions) == 0:
        return np.empty(0, dtype=np.uint64)
    n_pages = ((regions[:, 1] - regions[:, 0]) // np.uint64(page_size_bytes)).astype(np.int64)
    total = int(n_pages.sum())
    first_index = np.cumsum(n_pages) - n_pages
    index_in_region = np.arange(total, dtype=np.uint64) - np.repeat(first_index, n_pages).astype(np.uint64)
    return np.repeat(regions[:, 0], n_pages) + index_in_region * np.uint64(page_size_bytes)
