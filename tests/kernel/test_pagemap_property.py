"""Property: whatever pages are written, harvest returns exactly them as merged regions, then nothing."""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from writewatchd.kernel import PAGE_SIZE, PagemapScanner, UffdFeature, Userfaultfd

from .memhelpers import Mem, munmap, raw_mmap

N_PAGES = 300


def merged(pages: set[int]) -> list[tuple[int, int]]:
    """Sorted page indices as maximal ``[first, end)`` runs."""
    runs: list[tuple[int, int]] = []
    for page in sorted(pages):
        if runs and runs[-1][1] == page:
            runs[-1] = (runs[-1][0], page + 1)
        else:
            runs.append((page, page + 1))
    return runs


@pytest.fixture(scope="module", params=["anon", "shmem"])
def area(request: pytest.FixtureRequest, uffd_features: UffdFeature) -> Iterator[tuple[Mem, PagemapScanner]]:
    length = N_PAGES * PAGE_SIZE
    sharing = mmap.MAP_SHARED if request.param == "shmem" else mmap.MAP_PRIVATE
    addr = raw_mmap(length, mmap.PROT_READ | mmap.PROT_WRITE, sharing | mmap.MAP_ANONYMOUS)
    mem = Mem(request.param, addr, length)
    try:
        with Userfaultfd.create(user_mode_only=True) as uffd, PagemapScanner(capacity_regions=64) as pm:
            uffd.api(UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED)
            uffd.register(addr, length)
            uffd.write_protect(addr, length)
            yield mem, pm
    finally:
        munmap(addr, length)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rounds=st.lists(st.sets(st.integers(0, N_PAGES - 1), max_size=N_PAGES), min_size=1, max_size=3))
def test_harvest_returns_exactly_the_written_pages(area: tuple[Mem, PagemapScanner], rounds: list[set[int]]) -> None:
    mem, pm = area
    pm.harvest(mem.addr, mem.end)
    for pages in rounds:
        mem.write(pages)
        regions = pm.harvest(mem.addr, mem.end)
        assert regions.dtype == np.uint64
        assert [((int(a) - mem.addr) // PAGE_SIZE, (int(b) - mem.addr) // PAGE_SIZE) for a, b in regions] == merged(
            pages
        )
        assert pm.harvest(mem.addr, mem.end).shape == (0, 2)
