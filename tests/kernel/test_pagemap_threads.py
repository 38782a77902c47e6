"""Port of ``transact_test``: writers race with re-protecting scans, and no write is lost.

Six threads store into their own pages with ``ctypes.memset``, which releases the GIL, so the
stores really run while the main thread's PAGEMAP_SCAN (also GIL-free) re-protects pages.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

from writewatchd.kernel import PAGE_SIZE, ScanFlag

from .memhelpers import WRITTEN, MemFactory, Tracked, page_set

N_THREADS = 6
PAGES_PER_THREAD = 8
N_ROUNDS = 150


def test_concurrent_writers_lose_no_update(make_mem: MemFactory, track: Callable[..., Tracked]) -> None:
    n_pages = N_THREADS * PAGES_PER_THREAD
    tracked = track(make_mem("anon", n_pages))
    mem = tracked.mem
    start_round = threading.Barrier(N_THREADS + 1)
    finished = threading.Semaphore(0)
    failures: list[BaseException] = []

    def writer(index: int) -> None:
        first = mem.page(index * PAGES_PER_THREAD)
        try:
            for round_number in range(N_ROUNDS):
                start_round.wait()
                for page in range(PAGES_PER_THREAD):
                    ctypes.memset(first + page * PAGE_SIZE, round_number & 0xFF, PAGE_SIZE)
                finished.release()
        except BaseException as exc:  # surfaced by the main thread's assertion
            failures.append(exc)
            start_round.abort()

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(N_THREADS)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(N_ROUNDS):
            start_round.wait(timeout=30)
            seen: set[int] = set()
            n_finished = 0
            while n_finished < N_THREADS:
                # A scan with max_pages, as the selftest does, so partial walks race with the stores too.
                result = tracked.scanner.scan(
                    mem.addr, mem.end, flags=ScanFlag.WP_MATCHING, category_mask=WRITTEN, max_pages=PAGES_PER_THREAD
                )
                got = page_set(result.regions, mem.addr)
                seen |= got
                while finished.acquire(blocking=False):
                    n_finished += 1
            final = tracked.harvest()
            seen |= final
            assert seen == set(range(n_pages))
        assert tracked.written() == set()
    finally:
        start_round.abort()
        for thread in threads:
            thread.join(timeout=10)
    assert not failures
