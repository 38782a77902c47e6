"""Fixtures of the kernel conformance suite: real memory, userfaultfds, scanners, processes.

Every mapping, userfaultfd, file and the hugetlb pool size is restored when the test (or
session) ends. The helpers they are built from, which tests import, are in ``memhelpers.py``.
"""

from __future__ import annotations

import fcntl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from writewatchd.kernel import PagemapScanner, UffdFeature, Userfaultfd
from writewatchd.kernel.inject import _window
from writewatchd.kernel.inject import helper as inject_helper
from writewatchd.kernel.probe import Capabilities, probe

from .memhelpers import Mem, MemFactory, Tracked

HUGETLB_POOL_PAGES = 8
HUGETLB_LOCK_PATH = "/tmp/writewatch-tests-hugetlb.lock"


@pytest.fixture(params=["c", "python"])
def window(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each implementation of the injection's stop window in turn (the compiled one, Python).

    The injection suites use it for every test (``usefixtures``); a test parametrizes
    ``window`` itself to run once.
    """
    chosen = str(request.param)
    if chosen == "c" and _window.load() is None:
        pytest.skip("the compiled injection window cannot be built here")
    monkeypatch.setattr(inject_helper, "DEFAULT_WINDOW", chosen)
    return chosen


@pytest.fixture
def make_mem(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MemFactory]:
    """``make_mem(kind, n_pages)``: a fresh mapping of one of :data:`KINDS`."""
    factory = MemFactory(tmp_path, request)
    yield factory
    factory.close()


def _read_int(path: Path) -> int:
    return int(path.read_text().split()[0])


@pytest.fixture(scope="session")
def hugetlb_pool() -> Iterator[None]:
    """Raise the default hugetlb pool by a few pages for this session, lowering it by as much afterwards."""
    sysctl = Path("/proc/sys/vm/nr_hugepages")
    if not sysctl.exists():
        pytest.skip("the kernel has no hugetlbfs support")
    if Path("/proc/meminfo").read_text().find("Hugepagesize:       2048 kB") < 0:
        pytest.skip("the default hugetlb page size is not 2 MiB")
    try:
        added = _adjust_hugetlb_pool(sysctl, HUGETLB_POOL_PAGES)
    except OSError as exc:
        pytest.skip(f"cannot raise vm.nr_hugepages: {exc}")
    try:
        free = int(
            next(
                line.split()[1]
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("HugePages_Free:")
            )
        )
        if free < HUGETLB_POOL_PAGES:
            pytest.skip(f"only {free} hugetlb pages could be reserved")
        yield
    finally:
        _adjust_hugetlb_pool(sysctl, -added)


def _adjust_hugetlb_pool(sysctl: Path, delta_pages: int) -> int:
    """Change nr_hugepages by ``delta_pages``; returns the change made.

    Relative and under a lock, so concurrent test sessions doing the same never undo each other.
    """
    with open(HUGETLB_LOCK_PATH, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = _read_int(sysctl)
        sysctl.write_text(f"{max(before + delta_pages, 0)}\n")
        return _read_int(sysctl) - before


@pytest.fixture(scope="session")
def uffd_features() -> UffdFeature:
    try:
        features = Userfaultfd.supported_features()
    except OSError as exc:
        pytest.skip(f"userfaultfd is unavailable: {exc}")
    if not features & UffdFeature.WP_ASYNC:
        pytest.skip("userfaultfd lacks UFFD_FEATURE_WP_ASYNC (Linux >= 6.7)")
    return features


@pytest.fixture
def uffd(uffd_features: UffdFeature) -> Iterator[Userfaultfd]:
    """A WP_ASYNC userfaultfd of this process, as the kernel selftest configures it."""
    wanted = UffdFeature.WP_ASYNC | UffdFeature.WP_UNPOPULATED
    wanted |= uffd_features & UffdFeature.WP_HUGETLBFS_SHMEM
    with Userfaultfd.create(user_mode_only=True) as ctx:
        ctx.api(wanted)
        yield ctx


@pytest.fixture
def scanner() -> Iterator[PagemapScanner]:
    try:
        pm = PagemapScanner(capacity_regions=8192)
        pm.ioctl(0, 0)
    except OSError as exc:
        pytest.skip(f"PAGEMAP_SCAN is unavailable: {exc}")
    with pm:
        yield pm


@pytest.fixture
def track(uffd: Userfaultfd, scanner: PagemapScanner) -> Callable[..., Tracked]:
    """``track(mem, protect=True)``: register ``mem`` for WP and (by default) write-protect it."""

    def _track(mem: Mem, *, protect: bool = True) -> Tracked:
        uffd.register(mem.addr, mem.length_bytes)
        tracked = Tracked(mem, uffd, scanner)
        if protect:
            tracked.protect()
        return tracked

    return _track


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A child ``sleep 60`` that has finished its exec; killed and reaped at teardown."""
    process = subprocess.Popen(["sleep", "60"])
    # Popen returns after fork; wait for the exec so /proc shows "sleep", not a copy of us.
    for _ in range(1000):
        if Path(f"/proc/{process.pid}/comm").read_text().strip() == "sleep":
            break
        time.sleep(0.005)
    yield process
    process.kill()
    process.wait()


@pytest.fixture(scope="session")
def kernel_caps() -> Capabilities:
    """This kernel's probed answers, for tests whose expectation differs between builds."""
    return probe()
