"""The batched harvest (compiled and Python) on real targets: exact, resumable, errors kept per range."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from targets import PAGE, CoopTarget
from writewatchd.kernel import PagemapScanner, Userfaultfd
from writewatchd.kernel.batchscan import BatchRequests, BatchScanner, harvest_parallel, load


@pytest.fixture(params=["c", "python"])
def compiled(request: pytest.FixtureRequest) -> bool:
    """Each implementation of the batch in turn."""
    if request.param == "c" and load() is None:
        pytest.skip("no C compiler")
    return bool(request.param == "c")


class Armed:
    """A cooperative target whose whole buffer is registered for async write-protect, with a pagemap fd."""

    def __init__(self, n_pages: int) -> None:
        self.target = CoopTarget(n_pages)
        self.uffd = Userfaultfd.from_process(self.target.pid, self.target.uffd_fd)
        self.uffd.api()
        self.uffd.register(self.target.base, self.target.end - self.target.base)
        self.uffd.write_protect(self.target.base, self.target.end - self.target.base)
        self.scanner = PagemapScanner(self.target.pid)

    def close(self) -> None:
        self.scanner.close()
        self.uffd.close()
        self.target.kill()


@pytest.fixture
def armed() -> Iterator[list[Armed]]:
    targets = [Armed(96) for _ in range(3)]
    yield targets
    for t in targets:
        t.close()


def _requests(targets: list[Armed], split_pages: int = 32) -> tuple[BatchRequests, list[int]]:
    """Every target's buffer cut into ranges of ``split_pages``; the owner index of each request."""
    fds, starts, ends, owners = [], [], [], []
    for index, t in enumerate(targets):
        for first in range(0, t.target.n_pages, split_pages):
            fds.append(t.scanner.fileno())
            starts.append(t.target.base + first * PAGE)
            ends.append(min(t.target.end, t.target.base + (first + split_pages) * PAGE))
            owners.append(index)
    return BatchRequests(fds, starts, ends), owners


def _found(targets: list[Armed], result_regions: list[np.ndarray], owners: list[int]) -> list[set[int]]:
    pages: list[set[int]] = [set() for _ in targets]
    for owner, regions in zip(owners, result_regions, strict=True):
        pages[owner] |= targets[owner].target.pages(regions)
    return pages


@pytest.mark.parametrize("capacity", [1, 3, 1 << 12])
def test_batch_reports_exactly_the_writes_and_reprotects(armed: list[Armed], compiled: bool, capacity: int) -> None:
    scanner = BatchScanner(capacity_regions=capacity, compiled=compiled)
    assert scanner.compiled == compiled
    requests, owners = _requests(armed)
    scanner.harvest(requests)  # a fresh registration: nothing written yet
    for seed in range(1, 6):
        # Strided writes make many separate regions, so a small buffer fills inside one range.
        written = [t.target.stride_write(seed, 20, 3) | t.target.random_writes(seed, 10) for t in armed]
        result = scanner.harvest(requests)
        assert not result.errors.any()
        assert _found(armed, [result.regions_of(i) for i in range(len(requests))], owners) == written
        news = set(result.news.tolist())
        assert news == {i for i in range(len(requests)) if len(result.regions_of(i))}
        again = scanner.harvest(requests)
        assert len(again.regions) == 0 and len(again.news) == 0


def test_a_failing_range_keeps_its_errno_and_the_batch_goes_on(armed: list[Armed], compiled: bool) -> None:
    scanner = BatchScanner(compiled=compiled)
    first, second = armed[0], armed[1]
    first.uffd.unregister(first.target.base, 8 * PAGE)  # CHECK_WPASYNC refuses this range now (EPERM)
    requests = BatchRequests(
        [first.scanner.fileno(), second.scanner.fileno()],
        [first.target.base, second.target.base],
        [first.target.end, second.target.end],
    )
    scanner.harvest(requests)
    second.target.write(5, 2)
    result = scanner.harvest(requests)
    assert result.errors[0] != 0 and result.errors[1] == 0
    assert second.target.pages(result.regions_of(1)) == {5, 6}
    assert result.news.tolist() == [0, 1]


@pytest.mark.parametrize("split_pages", [8, 96])
def test_parallel_parts_report_what_one_batch_would(
    armed: list[Armed], compiled: bool, split_pages: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Split across threads, also inside one range (96: one request per target, cut in pieces)."""
    import writewatchd.kernel.batchscan as batchscan

    monkeypatch.setattr(batchscan, "_MIN_PAGES_PER_PART", 1)  # split even this small batch
    monkeypatch.setattr(batchscan, "_PIECE_ALIGN", 4 * PAGE)
    scanners = [BatchScanner(compiled=compiled) for _ in range(3)]
    requests, owners = _requests(armed, split_pages=split_pages)
    scanners[0].harvest(requests)
    armed[1].uffd.unregister(armed[1].target.base + 40 * PAGE, PAGE)  # one piece of one range fails
    written = [t.target.random_writes(7, 30) for t in armed]
    with ThreadPoolExecutor(2) as executor:
        result = harvest_parallel(scanners, requests, executor)
    found = _found(armed, [result.regions_of(i) for i in range(len(requests))], owners)
    failed = {owners[i] for i in np.flatnonzero(result.errors)}
    assert failed == {1}
    assert [f for i, f in enumerate(found) if i not in failed] == [w for i, w in enumerate(written) if i not in failed]
    assert len(result.offsets) == len(requests) + 1
