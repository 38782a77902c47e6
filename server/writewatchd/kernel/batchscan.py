"""Harvest many ranges of many processes in one call: ``_batchscan.c``, or the same loop in Python.

The daemon's tick scans every due range of every session of one tick interval. One ctypes
call per range costs more than the kernel's walk of a small idle range, so the whole tick is
one call into ``_batchscan.c`` (compiled on first use by :mod:`._compile`; ctypes releases
the GIL for the batch). Without a compiler, :class:`BatchScanner` runs the same loop with one
ctypes ioctl per range (:attr:`BatchScanner.compiled` is False).

A :class:`BatchRequests` holds the requests as one structured array that mirrors
``struct ww_scan_request``; :meth:`BatchScanner.harvest` fills their results and returns the
regions of all of them in request order. Errors are not raised: each request keeps its errno,
and the caller (the tracker of that range) decides what a failure means.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .._exceptions import UsageError
from ._compile import compile_library
from ._libc import ioctl
from .pagemap import HARVEST_FLAGS, PAGE_SHIFT, PAGEMAP_SCAN, Category, PmScanArg

__all__ = ["REQUEST_DTYPE", "BatchRequests", "BatchResult", "BatchScanner", "harvest_parallel", "load"]

_SOURCE = Path(__file__).with_name("_batchscan.c")

#: ``struct ww_scan_request`` of ``_batchscan.c``.
REQUEST_DTYPE = np.dtype(
    [
        ("fd", np.int32),
        ("error", np.int32),
        ("start", np.uint64),
        ("end", np.uint64),
        ("first_region", np.uint64),
        ("n_regions", np.uint64),
        ("resume_at", np.uint64),
    ],
    align=True,
)
_REGION_FIELDS = 3
_NO_REGIONS = np.empty((0, 2), np.uint64)
_NO_REGIONS.flags.writeable = False
_DEFAULT_CAPACITY_REGIONS = 1 << 16
# Below this many pages to walk, splitting a batch across threads costs more than it saves.
_MIN_PAGES_PER_PART = 1 << 18
_PIECE_ALIGN = 2 << 20


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled batch harvester, or None (logged once) when it cannot be built or loaded."""
    library = compile_library(_SOURCE, "tick harvests make one ctypes call per range")
    if library is None:
        return None
    library.ww_request_size.restype = ctypes.c_size_t
    if library.ww_request_size() != REQUEST_DTYPE.itemsize:
        return None
    library.ww_harvest_batch.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_size_t),
    ]
    library.ww_harvest_batch.restype = ctypes.c_size_t
    return library


class BatchRequests:
    """``(pagemap fd, start, end)`` requests, in the layout ``_batchscan.c`` reads."""

    def __init__(self, fds: npt.ArrayLike, starts: npt.ArrayLike, ends: npt.ArrayLike) -> None:
        fd_array = np.asarray(fds, dtype=np.int32)
        array = np.zeros(len(fd_array), dtype=REQUEST_DTYPE)
        array["fd"] = fd_array
        array["start"] = starts
        array["end"] = ends
        self.array = array

    @classmethod
    def of_array(cls, array: npt.NDArray[np.void]) -> BatchRequests:
        """Requests over an existing ``REQUEST_DTYPE`` array (a view: results land in it)."""
        requests = cls.__new__(cls)
        requests.array = array
        return requests

    def __len__(self) -> int:
        return len(self.array)

    @functools.cached_property
    def n_pages(self) -> int:
        """Pages the batch walks (what its kernel time is proportional to)."""
        return int(((self.array["end"] - self.array["start"]) >> np.uint64(PAGE_SHIFT)).sum())


@dataclass(frozen=True, slots=True)
class BatchResult:
    """Regions of a batch: request ``i`` found ``regions[offsets[i]:offsets[i + 1]]``; ``errors[i]`` is its errno."""

    regions: npt.NDArray[np.uint64]
    offsets: npt.NDArray[np.int64]
    errors: npt.NDArray[np.int32]
    news: npt.NDArray[np.intp] = field(init=False)
    """Indices of the requests that found something or failed: the only ones a caller needs to look at."""

    def __post_init__(self) -> None:
        news = np.flatnonzero((self.offsets[1:] != self.offsets[:-1]) | (self.errors != 0))
        object.__setattr__(self, "news", news)

    def regions_of(self, index: int) -> npt.NDArray[np.uint64]:
        """The ``(n, 2)`` regions request ``index`` found, sorted (a region may be split in two touching rows)."""
        return self.regions[self.offsets[index] : self.offsets[index + 1]]


class BatchScanner:
    """Runs :class:`BatchRequests` (not thread-safe: one output buffer; one scanner per thread)."""

    def __init__(self, *, capacity_regions: int = _DEFAULT_CAPACITY_REGIONS, compiled: bool = True) -> None:
        if capacity_regions < 1:
            raise UsageError(f"capacity_regions must be >= 1, got {capacity_regions}")
        self._library = load() if compiled else None
        self._buffer = np.empty((capacity_regions, _REGION_FIELDS), dtype=np.uint64)  # only filled rows are read
        self._n_used = ctypes.c_size_t(0)

    @property
    def compiled(self) -> bool:
        """Whether the batch runs in compiled code (else one ctypes ioctl per range)."""
        return self._library is not None

    def harvest(self, requests: BatchRequests) -> BatchResult:
        """Harvest every request (write-protecting what it reports), in one call while the buffer lasts."""
        array = requests.array
        n = len(array)
        done = self._run(array, 0)
        used = int(self._n_used.value)
        offsets = np.zeros(n + 1, dtype=np.int64)
        if done >= n:  # the common case: everything fitted in the buffer at once
            np.cumsum(array["n_regions"], out=offsets[1:])
            regions = self._buffer[:used, :2].copy() if used else _NO_REGIONS
            return BatchResult(regions, offsets, array["error"].copy())
        counts = np.zeros(n, dtype=np.int64)
        chunks: list[npt.NDArray[np.uint64]] = []
        resumed: dict[int, int] = {}
        first = 0
        while True:
            if used:
                chunks.append(self._buffer[:used, :2].copy())
            stop = min(done + 1, n)
            counts[first:stop] += array["n_regions"][first:stop].astype(np.int64)
            if done >= n:
                break
            # The buffer filled inside request `done`: continue it where the kernel stopped.
            resumed.setdefault(done, int(array["start"][done]))
            array["start"][done] = array["resume_at"][done]
            first = done
            done = self._run(array, first)
            used = int(self._n_used.value)
        for index, start in resumed.items():
            array["start"][index] = start
        np.cumsum(counts, out=offsets[1:])
        return BatchResult(np.concatenate(chunks), offsets, array["error"].copy())

    def _run(self, array: npt.NDArray[np.void], first: int) -> int:
        """Requests ``first..`` into the buffer; the index where it filled, or ``len(array)``."""
        view = array[first:]
        if self._library is not None:
            done: int = self._library.ww_harvest_batch(
                view.ctypes.data, len(view), self._buffer.ctypes.data, len(self._buffer), ctypes.byref(self._n_used)
            )
            return first + done
        return first + self._run_python(view)

    def _run_python(self, view: npt.NDArray[np.void]) -> int:
        """``ww_harvest_batch`` in Python: the same walk, one ctypes ioctl per kernel call."""
        capacity = len(self._buffer)
        base = int(self._buffer.ctypes.data)
        arg = PmScanArg(
            size=ctypes.sizeof(PmScanArg),
            flags=HARVEST_FLAGS,
            category_mask=Category.WRITTEN,
            return_mask=Category.WRITTEN,
        )
        arg_ref = ctypes.byref(arg)
        used = 0
        for index in range(len(view)):
            request = view[index]
            request["error"] = 0
            request["first_region"] = used
            request["n_regions"] = 0
            request["resume_at"] = request["end"]
            position, end = int(request["start"]), int(request["end"])
            fd = int(request["fd"])
            while position < end:
                if used == capacity:
                    request["resume_at"] = position
                    self._n_used.value = used
                    return index
                arg.start, arg.end = position, end
                arg.vec, arg.vec_len = base + used * _REGION_FIELDS * 8, capacity - used
                n = ioctl(fd, PAGEMAP_SCAN, arg_ref)
                if n < 0:
                    request["error"] = -n
                    break
                used += n
                request["n_regions"] += n
                if n < arg.vec_len:
                    break
                position = int(arg.walk_end)
                if n:
                    position = max(position, int(self._buffer[used - 1, 1]))
        self._n_used.value = used
        return len(view)


def harvest_parallel(
    scanners: Sequence[BatchScanner], requests: BatchRequests, executor: Executor | None
) -> BatchResult:
    """``requests`` split across ``scanners`` when the kernel's walk is long enough to gain.

    Requests are cut into pieces (on 2 MiB boundaries) so that even one huge range is shared;
    the result is per request, as :meth:`BatchScanner.harvest` returns it. The first part runs
    in the calling thread, each other part in a thread of ``executor`` (which must not be the
    caller's own pool: the caller waits for them).
    """
    n_parts = min(len(scanners), requests.n_pages // _MIN_PAGES_PER_PART)
    if n_parts <= 1 or executor is None:
        return scanners[0].harvest(requests)
    array = requests.array
    starts, ends = array["start"].astype(np.int64), array["end"].astype(np.int64)
    share = max(_PIECE_ALIGN, -(-int((ends - starts).sum()) // n_parts) // _PIECE_ALIGN * _PIECE_ALIGN)
    # Cut points inside each request: the multiples of `share` past its start.
    owners: list[int] = []
    piece_starts: list[int] = []
    piece_ends: list[int] = []
    for index, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        cut = start
        while cut < end:
            following = min(end, (cut // share + 1) * share)
            owners.append(index)
            piece_starts.append(cut)
            piece_ends.append(following)
            cut = following
    pieces = BatchRequests(array["fd"][owners], piece_starts, piece_ends)
    sizes = np.asarray(piece_ends, np.float64) - np.asarray(piece_starts, np.float64)
    cuts = np.searchsorted(np.cumsum(sizes), np.linspace(0, sizes.sum(), n_parts + 1)[1:-1], side="right")
    bounds = [0, *sorted({int(c) for c in cuts if 0 < int(c) < len(pieces)}), len(pieces)]
    parts = [BatchRequests.of_array(pieces.array[lo:hi]) for lo, hi in itertools.pairwise(bounds)]
    # The first part runs in this thread, the others in the executor's.
    futures = [executor.submit(scanner.harvest, part) for scanner, part in zip(scanners[1:], parts[1:], strict=False)]
    results = [scanners[0].harvest(parts[0]), *(future.result() for future in futures)]
    regions = np.concatenate([r.regions for r in results])
    piece_counts = np.concatenate([np.diff(r.offsets) for r in results])
    piece_errors = np.concatenate([r.errors for r in results])
    owner_array = np.asarray(owners, np.int64)
    offsets = np.zeros(len(requests) + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner_array, weights=piece_counts, minlength=len(requests)).astype(np.int64), out=offsets[1:])
    errors = np.zeros(len(requests), np.int32)
    failed = piece_errors != 0
    errors[owner_array[failed][::-1]] = piece_errors[failed][::-1]  # the first failure of each request
    return BatchResult(regions, offsets, errors)
