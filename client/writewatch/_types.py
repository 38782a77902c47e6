"""Value types returned by the client."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from .regions import DEFAULT_PAGE_SIZE_BYTES, Regions, count_pages

__all__ = [
    "AttachMode",
    "Delta",
    "EndReason",
    "PageCategory",
    "RetryPolicy",
    "ScanResult",
    "WriteWatchResult",
]


class AttachMode(enum.IntEnum):
    """How the daemon obtains the target's userfaultfd (``writewatch.v1.AttachMode``)."""

    UNSPECIFIED = 0
    COOPERATIVE = 1
    INJECT = 2
    SPAWN = 3


class EndReason(enum.IntEnum):
    """Why a session or a subscription ended (``writewatch.v1.EndReason``)."""

    UNSPECIFIED = 0
    EXITED = 1
    DELETED = 2
    DAEMON_SHUTDOWN = 3
    EVICTED = 4
    EXECED = 5
    ERROR = 6


class PageCategory(enum.IntFlag):
    """PAGEMAP_SCAN ``PAGE_IS_*`` bits, for the masks of ``Session.scan``."""

    WPALLOWED = 1 << 0
    WRITTEN = 1 << 1
    FILE = 1 << 2
    PRESENT = 1 << 3
    SWAPPED = 1 << 4
    PFNZERO = 1 << 5
    HUGE = 1 << 6
    SOFT_DIRTY = 1 << 7
    GUARD = 1 << 8


@dataclass(frozen=True, slots=True)
class Delta:
    """Pages written in one harvest, or in seqs ``first_seq..seq`` merged for a slow reader."""

    session_id: str
    epoch: int
    seq: int
    first_seq: int
    resync: bool
    """True when every tracked range is reported written (new epoch or lost history)."""
    harvested_at_unix_ns: int
    regions: Regions = field(repr=False)
    """``(n, 2)`` uint64 ``[start, end)`` byte addresses, sorted, all fragments joined."""
    page_size_bytes: int = DEFAULT_PAGE_SIZE_BYTES
    fragment_index: int = 0
    """0 for a whole delta; for one fragment (see :func:`writewatch.decode_delta`), its index."""
    n_fragments: int = 1
    """1 for a whole delta; for one fragment, how many make the delta (join with ``FragmentAssembler``)."""
    covered: Regions | None = field(default=None, repr=False)
    """What the harvest scanned (the coverage rule): None when it scanned every tracked range;
    else the ranges a heat-scheduled tick scanned. Every write to them completed before the
    harvest is in this delta or an earlier one."""

    @property
    def n_regions(self) -> int:
        """Number of regions."""
        return len(self.regions)

    @property
    def n_pages(self) -> int:
        """Number of written pages."""
        return count_pages(self.regions, self.page_size_bytes)

    @property
    def size_bytes(self) -> int:
        """Written bytes (whole pages)."""
        return self.n_pages * self.page_size_bytes


@dataclass(frozen=True, slots=True)
class WriteWatchResult:
    """Answer of ``View.get_write_watch``: Win32 GetWriteWatch's addresses and granularity."""

    addresses: list[int]
    """Ascending byte addresses of written pages."""
    granularity_bytes: int

    @property
    def granularity(self) -> int:
        """Bytes per address (Win32's ``lpdwGranularity``)."""
        return self.granularity_bytes


@dataclass(frozen=True, slots=True)
class ScanResult:
    """Answer of ``Session.scan``: matching regions and their ``PAGE_IS_*`` categories."""

    regions: Regions = field(repr=False)
    """``(n, 2)`` uint64 ``[start, end)`` byte addresses."""
    categories: np.ndarray[tuple[int], np.dtype[np.uint64]] = field(repr=False)
    """uint64 category bits per region, parallel to regions."""
    complete: bool
    """False when max_pages or the daemon's limit stopped the scan early."""
    resume_address: int
    """Where to continue when not complete."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How ``subscribe`` reconnects after UNAVAILABLE or CANCELLED: exponential backoff, bounded attempts."""

    max_attempts: int = 8
    """Consecutive failed reconnects before the error is raised (0 disables reconnecting)."""
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def backoff_s(self, attempt: int) -> float:
        """Delay before reconnect number ``attempt`` (1-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
