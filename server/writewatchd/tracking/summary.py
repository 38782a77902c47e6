"""Page count, touching rows and the wire's (gap, n) pairs of a region array, in one call.

The daemon needs these right after each scan (``Tracker.harvest`` and the encoding of a
delta), when the caches hold what the page-table walk left and every numpy call costs tens
of microseconds. ``_regions.c`` does all of it in one pass, compiled on first use by
:mod:`..kernel._compile`; without a compiler the same results come from numpy, and the
pairs from the wire codec (``pairs`` is then None).

The pass can also make the region array itself: :func:`regions_of_scan` is how a tracker's
:class:`~writewatchd.kernel.PagemapScanner` copies its rows out. The summary made on the way
(or by ``summarize(..., remember=True)``) is remembered for that array, made read-only so
that it stays true, and the delta's encoding that follows in the same thread makes no pass
of its own.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from ..kernel._compile import compile_library
from ..kernel.pagemap import PAGE_SHIFT
from .regions import RegionArray, n_pages

__all__ = ["RegionSummary", "regions_of_scan", "summarize"]

_SOURCE = Path(__file__).with_name("_regions.c")
_U32_MAX = 0xFFFF_FFFF
_PAIR_BYTES = 8  # a narrow (gap, n) pair: two little-endian u32
_ERRORS = {
    1: "region bounds must be multiples of the page size",
    2: "every region must have start < end",
    3: "regions must be sorted and non-overlapping",
    4: "base_address is above the first region",
}


class RegionSummary(NamedTuple):
    """What one pass over a region array found."""

    n_pages: int
    n_touching: int
    """Rows that start exactly where the previous one ends (0 for merged regions)."""
    pairs: memoryview | None
    """The little-endian u32 ``(gap, n)`` pairs in pages from the base (a byte view), when asked for,
    compiled and narrow."""


class _Summary(ctypes.Structure):
    _fields_ = [("n_pages", ctypes.c_uint64), ("n_touching", ctypes.c_uint64), ("max_step", ctypes.c_uint64)]


class _Remembered(threading.local):
    """The last array summarized for keeps in this thread, with its summary (pairs from its first start)."""

    regions: RegionArray | None = None
    summary: RegionSummary | None = None


_remembered = _Remembered()


class _Compiled(NamedTuple):
    """The two entry points of ``_regions.c``."""

    summarize: Callable[..., int]
    copy_scan: Callable[..., int]


# Output buffers (and the scanner's) go to C as byref(ctypes.c_char.from_buffer(array)): a
# fraction of the cost of reading the address from the array's __array_interface__ (about
# 0.3 vs 1.1 us warm, and this runs with cold caches). It needs a writable buffer, so the input of
# summarize(), maybe read-only, still goes by address.
_BYTES = ctypes.POINTER(ctypes.c_char)


@functools.cache
def _compiled() -> _Compiled | None:
    library = compile_library(_SOURCE, "region summaries use numpy")
    if library is None:
        return None
    library.ww_summary_size.restype = ctypes.c_size_t
    if library.ww_summary_size() != ctypes.sizeof(_Summary):
        return None
    summary_pointer = ctypes.POINTER(_Summary)
    summarize_function = library.ww_summarize
    summarize_function.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_uint64,
        ctypes.c_uint,
        _BYTES,
        summary_pointer,
    ]
    copy_function = library.ww_copy_scan
    copy_function.argtypes = [_BYTES, ctypes.c_size_t, ctypes.c_uint, _BYTES, _BYTES, summary_pointer]
    summarize_function.restype = copy_function.restype = ctypes.c_int
    return _Compiled(summarize_function, copy_function)


def summarize(
    regions: RegionArray, *, base_address: int | None = None, pairs: bool = False, remember: bool = False
) -> RegionSummary:
    """Count the pages and touching rows of sorted, non-overlapping, page-aligned ``regions``.

    With ``pairs``, also the wire's u32 pairs relative to ``base_address`` (default: the first
    start). The compiled pass checks the regions on the way (ValueError if they are not
    sorted, aligned, non-empty rows); the numpy fallback trusts them and gives no pairs.
    ``remember`` (implies ``pairs`` from the first start) keeps the result for this array, which
    becomes read-only: its next summary in this thread is free.
    """
    if regions is _remembered.regions and (base_address is None or base_address == int(regions[0, 0])):
        known = _remembered.summary
        assert known is not None
        return known if pairs or remember else known._replace(pairs=None)
    if remember:
        known = summarize(regions, pairs=True)
        regions.flags.writeable = False
        _remembered.regions, _remembered.summary = regions, known
        return known
    compiled = _compiled()
    n_regions = len(regions)
    interface = regions.__array_interface__
    if (
        compiled is None
        or n_regions == 0
        or interface["strides"] is not None  # not C-contiguous
        or interface["typestr"] != "<u8"
    ):
        return _summarize_numpy(regions)
    # Without pairs the first gap does not matter.
    base = base_address if base_address is not None else int(regions[0, 0]) if pairs else 0
    out = _pairs_buffer(n_regions) if pairs else None
    summary = _Summary()
    result = compiled.summarize(interface["data"][0], n_regions, base, PAGE_SHIFT, _pointer(out), ctypes.byref(summary))
    return _checked(result, summary, out)


def regions_of_scan(rows: npt.NDArray[np.uint64], n_regions: int) -> RegionArray | None:
    """The ``[start, end)`` columns of the first ``n_regions`` PAGEMAP_SCAN rows as a new ``(n, 2)`` array.

    ``rows`` is a scanner's contiguous ``(capacity, 3)`` buffer. One compiled pass copies, checks
    and summarizes (pairs from the first start); the summary is remembered for the returned
    array, which is read-only so that it stays true. A full buffer is only copied: more rows
    follow, and the scanner joins them into another array. None without a compiler (the
    scanner then copies with numpy).
    """
    compiled = _compiled()
    if compiled is None:
        return None
    regions = np.empty((n_regions, 2), dtype=np.uint64)
    if n_regions == 0:
        return regions
    last = n_regions < len(rows)
    out = _pairs_buffer(n_regions) if last else None
    summary = _Summary()
    result = compiled.copy_scan(
        _pointer(rows), n_regions, PAGE_SHIFT, _pointer(regions), _pointer(out), ctypes.byref(summary)
    )
    checked = _checked(result, summary, out)
    if last:
        regions.flags.writeable = False
        _remembered.regions, _remembered.summary = regions, checked
    return regions


def _pairs_buffer(n_regions: int) -> npt.NDArray[np.uint8]:
    # Not zeroed: the pass writes every pair it returns (a ctypes string buffer would be zeroed first).
    return np.empty(_PAIR_BYTES * n_regions, dtype=np.uint8)


def _pointer(array: npt.NDArray[np.generic] | None) -> object:
    """A writable contiguous array as the compiled pass takes it (None: NULL)."""
    # numpy arrays export the buffer protocol; their type stubs do not declare it.
    return None if array is None else ctypes.byref(ctypes.c_char.from_buffer(array))  # type: ignore[arg-type]


def _checked(result: int, summary: _Summary, out: npt.NDArray[np.uint8] | None) -> RegionSummary:
    """The pass's summary, or its refusal as ValueError; the pairs only when they are narrow."""
    if result:
        raise ValueError(_ERRORS.get(result, f"invalid regions ({result})"))
    narrow = out is not None and summary.max_step <= _U32_MAX
    return RegionSummary(summary.n_pages, summary.n_touching, out.data if narrow and out is not None else None)


def _summarize_numpy(regions: RegionArray) -> RegionSummary:
    """The counts without the compiled pass (no pairs, no validation beyond the page count's)."""
    if len(regions) < 2:
        return RegionSummary(n_pages(regions), 0, None)
    flat = regions.reshape(-1)
    gaps = np.subtract(flat[2::2], flat[1:-1:2])
    return RegionSummary(n_pages(regions), len(gaps) - int(np.count_nonzero(gaps)), None)
