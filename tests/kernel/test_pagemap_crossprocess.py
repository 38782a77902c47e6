"""Tracking another process: its own userfaultfd copied with pidfd_getfd, its pagemap scanned from here.

The target (tests/fixtures/conf_writers.c) runs six native writer threads, so the
``transact_test`` race happens between truly parallel stores and our re-protecting scans.
"""

from __future__ import annotations

import os
import select
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from writewatchd.kernel import PagemapScanner, ScanFlag, UffdFeature, Userfaultfd
from writewatchd.kernel.probe import Capabilities, ExitedScan, exited_scan_answer

from .memhelpers import WRITTEN, page_set, region_list

N_THREADS = 6
PAGES_PER_THREAD = 8
N_ROUNDS = 200
#: Scans per round at most, so that the monitor never spins against the writers for long.
MAX_SCANS_PER_ROUND = 20
#: Stores per page and round: later passes land after our re-protection of earlier ones.
N_PASSES = 10


class WritersTarget:
    """A running conf_writers process, driven line by line."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen(
            [str(binary), str(N_THREADS), str(PAGES_PER_THREAD), str(N_PASSES)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin = self.proc.stdin
        self._stdout = self.proc.stdout
        addr_hex, n_pages, uffd_fd = self._stdout.readline().split()
        self.addr = int(addr_hex, 16)
        self.n_pages = int(n_pages)
        self.uffd_fd = int(uffd_fd)
        self.end = self.addr + self.n_pages * 4096

    def send(self, line: str) -> None:
        self._stdin.write(line.encode() + b"\n")

    def ack_ready(self) -> bool:
        """Whether the reply to the last command has arrived (consumes it if so)."""
        ready, _, _ = select.select([self._stdout], [], [], 0)
        if not ready:
            return False
        assert self._stdout.read(3) == b"ok\n"
        return True

    def wait_ack(self) -> None:
        assert self._stdout.read(3) == b"ok\n"

    def command(self, line: str) -> None:
        self.send(line)
        self.wait_ack()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("q")
        self.proc.wait(timeout=10)


@pytest.fixture
def target(c_program: Callable[[str], Path], uffd_features: UffdFeature) -> Iterator[WritersTarget]:
    process = WritersTarget(c_program("conf_writers"))
    try:
        yield process
    finally:
        process.proc.kill()
        process.proc.wait()


@pytest.fixture
def monitor(target: WritersTarget) -> Iterator[tuple[Userfaultfd, PagemapScanner]]:
    with Userfaultfd.from_process(target.proc.pid, target.uffd_fd) as uffd, PagemapScanner(target.proc.pid) as pm:
        uffd.api()
        uffd.register(target.addr, target.end - target.addr)
        uffd.write_protect(target.addr, target.end - target.addr)
        yield uffd, pm


def test_exact_writes_of_another_process(target: WritersTarget, monitor: tuple[Userfaultfd, PagemapScanner]) -> None:
    _, pm = monitor
    assert pm.harvest(target.addr, target.end).shape == (0, 2)
    target.command("w 1 5 6 7 40")
    assert region_list(pm.harvest(target.addr, target.end), target.addr) == [(1, 2), (5, 8), (40, 41)]
    assert pm.harvest(target.addr, target.end).shape == (0, 2)


def test_parallel_native_writers_lose_no_update(
    target: WritersTarget, monitor: tuple[Userfaultfd, PagemapScanner]
) -> None:
    _, pm = monitor
    every_page = set(range(target.n_pages))
    for _ in range(N_ROUNDS):
        target.send("r")
        seen: set[int] = set()
        done = False
        for _ in range(MAX_SCANS_PER_ROUND):
            done = target.ack_ready()
            result = pm.scan(
                target.addr, target.end, flags=ScanFlag.WP_MATCHING, category_mask=WRITTEN, max_pages=PAGES_PER_THREAD
            )
            seen |= page_set(result.regions, target.addr)
            if done:
                break
        if not done:
            target.wait_ack()
        seen |= page_set(pm.harvest(target.addr, target.end), target.addr)
        assert seen == every_page
    assert pm.harvest(target.addr, target.end).shape == (0, 2)


def test_target_exit_scan_is_gone_or_empty_as_probed(
    target: WritersTarget, monitor: tuple[Userfaultfd, PagemapScanner], kernel_caps: Capabilities
) -> None:
    _, pm = monitor
    target.close()
    assert not os.path.exists(f"/proc/{target.proc.pid}")
    assert exited_scan_answer(pm) == kernel_caps.exited_scan_reaped
    if kernel_caps.exited_scan_reaped is ExitedScan.EMPTY:
        assert pm.harvest(target.addr, target.end).shape == (0, 2)
