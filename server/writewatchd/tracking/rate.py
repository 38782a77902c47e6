"""Dirty-rate estimation over a sliding time window of harvests."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

__all__ = ["DirtyRate", "RateEstimator"]


@dataclass(frozen=True, slots=True)
class DirtyRate:
    """Written pages, bytes and regions per second over ``window_ms``."""

    pages_per_second: float
    bytes_per_second: float
    regions_per_second: float
    window_ms: int


class RateEstimator:
    """Sums of harvest results inside a sliding window; O(1) amortised per sample."""

    def __init__(self, window_ms: int = 1000, page_size_bytes: int = 4096) -> None:
        self._window_ns = window_ms * 1_000_000
        self._page_size_bytes = page_size_bytes
        self._samples: deque[tuple[int, int, int]] = deque()
        self._n_pages = 0
        self._n_regions = 0
        self._started_ns = time.monotonic_ns()

    def add(self, n_pages: int, n_regions: int, *, now_ns: int | None = None) -> None:
        """Record one harvest result."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        self._samples.append((now_ns, n_pages, n_regions))
        self._n_pages += n_pages
        self._n_regions += n_regions
        self._expire(now_ns)

    def rate(self, *, now_ns: int | None = None) -> DirtyRate:
        """The rates over the window ending now (or since creation, if younger)."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        self._expire(now_ns)
        span_ns = min(self._window_ns, max(now_ns - self._started_ns, 1))
        per_second = 1e9 / span_ns
        pages = self._n_pages * per_second
        return DirtyRate(pages, pages * self._page_size_bytes, self._n_regions * per_second, span_ns // 1_000_000)

    def _expire(self, now_ns: int) -> None:
        horizon = now_ns - self._window_ns
        while self._samples and self._samples[0][0] < horizon:
            _, n_pages, n_regions = self._samples.popleft()
            self._n_pages -= n_pages
            self._n_regions -= n_regions
