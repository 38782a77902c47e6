"""A scanner's output buffer costs memory only where the kernel writes it.

Every session holds a :class:`PagemapScanner` with a 1.5 MiB buffer (the tick's
:class:`BatchScanner` one more). Once such buffers have been freed, glibc raises its mmap
threshold and serves the next ones from a thread's malloc arena; a zeroed buffer is then
memset in full there, and 200 sessions attached after 200 others ended held 300 MiB.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from writewatchd.kernel import PagemapScanner
from writewatchd.kernel.batchscan import BatchScanner

N_SCANNERS = 32
_BUFFER_PAGES = (1 << 16) * 24 // os.sysconf("SC_PAGE_SIZE")


def _resident_pages() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1])


def _make_after_recycling() -> tuple[int, list[PagemapScanner | BatchScanner]]:
    """Free buffers of the same size first (as ended sessions do), then make scanners; returns the pages they added."""
    # The first round is mmapped, and freeing it raises the threshold; the second comes from
    # the arena, which keeps that memory (not resident: never touched) for the next ones.
    for _ in range(2):
        freed = [np.empty(_BUFFER_PAGES * 512, np.uint64) for _ in range(N_SCANNERS)]
        del freed
    before = _resident_pages()
    scanners: list[PagemapScanner | BatchScanner] = [PagemapScanner() for _ in range(N_SCANNERS // 2)]
    scanners += [BatchScanner() for _ in range(N_SCANNERS // 2)]
    return _resident_pages() - before, scanners


def test_new_scanners_leave_their_buffers_untouched() -> None:
    # In a worker thread: the daemon attaches sessions in its executor, so from a thread's arena.
    with ThreadPoolExecutor(1) as pool:
        added_pages, scanners = pool.submit(_make_after_recycling).result()
    try:
        # Zeroed buffers would add N_SCANNERS * _BUFFER_PAGES (12288 pages); untouched ones next to nothing.
        assert added_pages < N_SCANNERS * _BUFFER_PAGES // 8
    finally:
        for scanner in scanners:
            if isinstance(scanner, PagemapScanner):
                scanner.close()
