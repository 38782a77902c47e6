"""spawn_tracked: a program started stopped at exec, with a userfaultfd injected before it runs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from writewatchd.kernel.pagemap import PAGE_SIZE, PagemapScanner
from writewatchd.kernel.procfs import read_maps
from writewatchd.kernel.spawn import spawn_tracked
from writewatchd.kernel.uffd import TRACKING_FEATURES, Userfaultfd, is_userfaultfd

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="spawn tests trace their programs: run as root"),
    # Every test runs with each implementation of the stop window (conftest.window).
    pytest.mark.usefixtures("window"),
]


def register_all_writable(uffd: Userfaultfd) -> list[str]:
    """What a daemon in "auto" mode would do before the program starts: track every private writable mapping."""
    uffd.api()
    registered = []
    for mapping in read_maps(uffd.owner_pid):
        if mapping.is_private_writable and not mapping.is_special:
            uffd.register(mapping.start, mapping.length_bytes)
            uffd.write_protect(mapping.start, mapping.length_bytes)
            registered.append(mapping.path)
    return registered


def test_writes_from_the_first_instructions_are_tracked(c_program: Callable[[str], Path], window: str) -> None:
    binary = c_program("inject_spawn")
    registered: list[str] = []
    spawned = spawn_tracked(
        [str(binary)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        before_start=lambda uffd: registered.extend(register_all_writable(uffd)),
    )
    try:
        assert spawned.window == window
        # Before its first instruction only the program's own image, ld.so and the stack exist.
        assert str(binary) in registered
        assert "[stack]" in registered
        assert spawned.popen.stdout is not None
        fields = spawned.popen.stdout.readline().decode().split()
        assert fields[0] == "buf"
        start, n_pages = int(fields[1], 16), int(fields[2])
        written = {int(page) for page in fields[4].split(",")}
        with PagemapScanner(spawned.pid) as scanner:
            harvested = scanner.harvest(start, start + n_pages * PAGE_SIZE)
        pages = {
            page
            for region_start, region_end in harvested.tolist()
            for page in range((region_start - start) // PAGE_SIZE, (region_end - start) // PAGE_SIZE)
        }
        assert pages == written
        assert not [fd for fd in os.listdir(f"/proc/{spawned.pid}/fd") if is_userfaultfd(spawned.pid, int(fd))]
        assert spawned.poll() is None
        assert spawned.popen.stdin is not None
        spawned.popen.stdin.close()
        assert spawned.wait(10) == 7
        assert spawned.returncode == 7
    finally:
        spawned.kill()
        spawned.uffd.close()


def test_uffd_is_handed_over_before_the_api_handshake(tmp_path: Path) -> None:
    spawned = spawn_tracked(
        ["sh", "-c", 'pwd; echo "$GREETING"; exec sleep 30'],
        env={"PATH": os.environ["PATH"], "GREETING": "hello"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
    )
    try:
        assert spawned.uffd.owner_pid == spawned.pid
        assert not spawned.uffd.initialized
        assert spawned.uffd.api() & TRACKING_FEATURES == TRACKING_FEATURES
        assert spawned.popen.stdout is not None
        assert spawned.popen.stdout.readline().decode().strip() == str(tmp_path)
        assert spawned.popen.stdout.readline().decode().strip() == "hello"
        assert Path(f"/proc/{spawned.pid}/status").read_text().count("TracerPid:\t0") == 1
    finally:
        spawned.kill()
        spawned.uffd.close()
    assert spawned.returncode == -9


def children() -> set[int]:
    tasks = Path("/proc/self/task")
    return {int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()}


def test_missing_program_raises_and_leaves_no_child() -> None:
    before = children()
    with pytest.raises(FileNotFoundError):
        spawn_tracked(["writewatch-no-such-program"])
    assert children() <= before


def test_failing_before_start_kills_the_program(c_program: Callable[[str], Path]) -> None:
    binary = c_program("inject_spawn")
    seen: list[int] = []

    def fail(uffd: Userfaultfd) -> None:
        seen.append(uffd.owner_pid)
        raise RuntimeError("no thanks")

    with pytest.raises(RuntimeError, match="no thanks"):
        spawn_tracked([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, before_start=fail)
    assert len(seen) == 1
    assert not Path(f"/proc/{seen[0]}").exists() or "Z" in Path(f"/proc/{seen[0]}/stat").read_text().split(") ")[1][:1]
