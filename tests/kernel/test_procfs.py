"""/proc readers against real processes and real mappings."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from writewatchd import ProcessGone
from writewatchd.kernel import MappingPerm, ProcessIdentity, read_maps, read_status, thread_ids
from writewatchd.kernel.procfs import (
    SeccompMode,
    child_pids,
    gained_privileges,
    parse_maps,
    parse_stat,
    read_cmdline,
    read_stat,
)

from .memhelpers import MemFactory, mprotect


class TestMaps:
    def test_own_mappings_with_exact_bounds_and_perms(self, make_mem: MemFactory) -> None:
        # A private memfd mapping never merges with a neighbouring VMA, so its bounds are exact.
        mem = make_mem("memfd_private", 8)
        mprotect(mem.page(4), 4 * 4096, 1)  # PROT_READ on the second half
        ours = [m for m in read_maps() if mem.addr <= m.start < mem.end]
        assert [(m.start, m.end) for m in ours] == [(mem.addr, mem.page(4)), (mem.page(4), mem.end)]
        assert ours[0].perms == MappingPerm.READ | MappingPerm.WRITE
        assert ours[1].perms == MappingPerm.READ
        assert ours[0].is_private_writable and not ours[1].is_private_writable
        assert ours[0].length_bytes == 4 * 4096

    def test_file_mapping_has_path_and_inode(self, make_mem: MemFactory) -> None:
        mem = make_mem("file_private", 4)
        (mapping,) = [m for m in read_maps() if m.start == mem.addr]
        assert mapping.path.endswith("private-1.bin")
        assert mapping.inode == os.stat(mapping.path).st_ino

    def test_shared_mapping_is_not_private_writable(self, make_mem: MemFactory) -> None:
        mem = make_mem("memfd", 2)
        (mapping,) = [m for m in read_maps() if m.start == mem.addr]
        assert MappingPerm.SHARED in mapping.perms
        assert not mapping.is_private_writable
        assert mapping.path.startswith("/memfd:wwconf-memfd")

    def test_parse_maps_handles_paths_with_spaces_and_no_path(self) -> None:
        text = (
            "7f00-8f00 rw-p 00001000 08:01 42    /tmp/a file (deleted)\n"
            "9000-a000 r-xp 00000000 00:00 0 \n"
            "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0   [vsyscall]\n"
        )
        parsed = parse_maps(text)
        assert [(m.start, m.end, m.offset_bytes, m.inode, m.path) for m in parsed] == [
            (0x7F00, 0x8F00, 0x1000, 42, "/tmp/a file (deleted)"),
            (0x9000, 0xA000, 0, 0, ""),
            (0xFFFFFFFFFF600000, 0xFFFFFFFFFF601000, 0, 0, "[vsyscall]"),
        ]
        assert parsed[2].is_special and not parsed[0].is_special

    def test_maps_of_a_gone_process(self, sleeper: subprocess.Popen[bytes]) -> None:
        sleeper.kill()
        sleeper.wait()
        with pytest.raises(ProcessGone):
            read_maps(sleeper.pid)


class TestStat:
    def test_parse_stat_takes_comm_up_to_its_last_parenthesis(self) -> None:
        fields = " ".join(str(n) for n in range(3, 53))  # field N holds N (state included, as "3")
        stat = parse_stat(f"4242 (a) (b c) {fields}\n")
        assert (stat.pid, stat.comm, stat.state) == (4242, "a) (b c", "3")
        assert (stat.utime_ticks, stat.stime_ticks, stat.start_time_ticks) == (14, 15, 22)
        assert (stat.start_code, stat.end_code, stat.start_stack, stat.arg_start) == (26, 27, 28, 48)

    def test_stat_of_a_child_and_of_its_thread(self, sleeper: subprocess.Popen[bytes]) -> None:
        stat = read_stat(sleeper.pid)
        assert (stat.pid, stat.comm) == (sleeper.pid, "sleep")
        assert stat.state in ("S", "R")
        assert read_stat(sleeper.pid, sleeper.pid).start_time_ticks == stat.start_time_ticks
        assert stat.start_time_ticks == ProcessIdentity.of(sleeper.pid).start_time_ticks

    def test_stat_of_a_gone_process(self, sleeper: subprocess.Popen[bytes]) -> None:
        sleeper.kill()
        sleeper.wait()
        with pytest.raises(ProcessGone):
            read_stat(sleeper.pid)


class TestIdentityAndStatus:
    def test_identity_detects_exit(self, sleeper: subprocess.Popen[bytes]) -> None:
        identity = ProcessIdentity.of(sleeper.pid)
        assert identity.is_alive()
        assert ProcessIdentity.of(sleeper.pid) == identity
        sleeper.kill()
        sleeper.wait()
        assert not identity.is_alive()

    def test_zombie_is_not_alive(self, sleeper: subprocess.Popen[bytes]) -> None:
        identity = ProcessIdentity.of(sleeper.pid)
        sleeper.kill()
        os.waitid(os.P_PID, sleeper.pid, os.WEXITED | os.WNOWAIT)
        assert not identity.is_alive()

    def test_recycled_pid_does_not_match(self, sleeper: subprocess.Popen[bytes]) -> None:
        identity = ProcessIdentity.of(sleeper.pid)
        impostor = ProcessIdentity(sleeper.pid, identity.start_time_ticks + 1)
        assert not impostor.is_alive()

    def test_status_of_self(self) -> None:
        status = read_status()
        assert status.effective_uid == os.geteuid()
        assert status.state in "RS"
        assert status.n_threads == len(os.listdir("/proc/self/task"))

    def test_status_of_a_child(self, sleeper: subprocess.Popen[bytes]) -> None:
        status = read_status(sleeper.pid)
        assert (status.name, status.n_threads, status.tracer_pid) == ("sleep", 1, 0)
        # A child inherits our seccomp filters (a container may have given us some).
        assert isinstance(status.seccomp_mode, SeccompMode)
        assert status.seccomp_mode == read_status().seccomp_mode

    def test_thread_ids_include_a_new_thread(self) -> None:
        started = threading.Event()
        release = threading.Event()
        native: list[int] = []

        def run() -> None:
            native.append(threading.get_native_id())
            started.set()
            release.wait(10)

        thread = threading.Thread(target=run)
        thread.start()
        try:
            started.wait(10)
            tids = thread_ids(os.getpid())
            assert os.getpid() in tids and native[0] in tids
            assert tids == sorted(tids)
        finally:
            release.set()
            thread.join()

    def test_thread_ids_of_a_gone_process(self, sleeper: subprocess.Popen[bytes]) -> None:
        sleeper.kill()
        sleeper.wait()
        with pytest.raises(ProcessGone):
            thread_ids(sleeper.pid)


def test_read_cmdline_and_child_pids_of_real_processes() -> None:
    parent = subprocess.Popen(["/bin/sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 10
        while len(child_pids(parent.pid)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        children = child_pids(parent.pid)
        assert len(children) == 2
        assert all(read_cmdline(c) == ["sleep", "30"] for c in children)
        assert read_cmdline(parent.pid) == ["/bin/sh", "-c", "sleep 30 & sleep 30 & wait"]
    finally:
        parent.kill()
        parent.wait()


def test_threads_are_not_children() -> None:
    code = (
        "import threading, time\n"
        "for _ in range(3):\n"
        "    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
        "print(flush=True)\n"
        "time.sleep(30)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        child.stdout.readline()
        assert len(thread_ids(child.pid)) == 4
        assert child_pids(child.pid) == []
    finally:
        child.kill()
        child.wait()


def test_gained_privileges() -> None:
    assert gained_privileges(os.getpid()) == ""
    probe = "import os, sys, time; os.setresuid(65534, 0, 0); print(flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        child.stdout.readline()
        assert "set-user-ID" in gained_privileges(child.pid)
    finally:
        child.kill()
        child.wait()
