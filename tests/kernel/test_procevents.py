"""The process-events connector against real processes (docs/kernel.md §8.11)."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import pytest

from targets import build_c
from writewatchd.kernel.procevents import (
    EventsLost,
    ProcEvent,
    ProcEventKind,
    ProcEventListener,
    proc_events_available,
    shares_memory,
)

pytestmark = pytest.mark.skipif(not proc_events_available()[0], reason="no process events here (CAP_NET_ADMIN)")


def _collect(
    listener: ProcEventListener, done: Callable[[list[ProcEvent]], bool], timeout_s: float = 10.0
) -> list[ProcEvent]:
    """Events until ``done(events)`` holds."""
    events: list[ProcEvent] = []
    deadline = time.monotonic() + timeout_s
    while not done(events):
        assert time.monotonic() < deadline, f"events never completed: {events}"
        events.extend(listener.read(0.2))
    return events


def _about(events: list[ProcEvent], tgids: set[int]) -> list[ProcEvent]:
    return [e for e in events if e.tgid in tgids]


def test_fork_exec_exit_of_a_shell_that_execs() -> None:
    with ProcEventListener() as listener:
        child = subprocess.Popen(["/bin/sh", "-c", "exec /bin/true"])
        child.wait()

        def exited(events: list[ProcEvent]) -> bool:
            return any(e.kind == ProcEventKind.EXIT and e.tgid == child.pid for e in events)

        mine = _about(_collect(listener, exited), {child.pid})
    kinds = [e.kind for e in mine]
    # Popen's own exec of /bin/sh, then sh's exec of /bin/true.
    assert kinds == [ProcEventKind.FORK, ProcEventKind.EXEC, ProcEventKind.EXEC, ProcEventKind.EXIT]
    fork = mine[0]
    assert fork.is_new_process
    assert (fork.parent_tgid, fork.pid) == (os.getpid(), child.pid)
    assert mine[-1].exit_code == 0
    assert mine[-1].parent_tgid == os.getpid()
    assert all(a.timestamp_ns <= b.timestamp_ns for a, b in itertools.pairwise(mine))


def test_exit_code_is_the_wait_status() -> None:
    with ProcEventListener() as listener:
        child = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
        child.wait()
        events = _collect(listener, lambda ev: any(e.kind == ProcEventKind.EXIT and e.tgid == child.pid for e in ev))
    (exit_event,) = [e for e in events if e.kind == ProcEventKind.EXIT and e.tgid == child.pid]
    assert os.waitstatus_to_exitcode(exit_event.exit_code) == 3


_THREADS_THEN_EXEC = textwrap.dedent(
    """
    import os, sys, threading
    ready = threading.Event()
    def worker():
        ready.wait()
        os.execv("/bin/true", ["/bin/true"])
    t = threading.Thread(target=worker)
    t.start()
    print(threading.get_native_id(), t.native_id, flush=True)
    ready.set()
    t.join()
    """
)


def test_threads_are_not_new_processes_and_exec_from_a_thread_reports_the_tgid() -> None:
    with ProcEventListener() as listener:
        child = subprocess.Popen([sys.executable, "-c", _THREADS_THEN_EXEC], stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        main_tid, thread_tid = (int(x) for x in child.stdout.readline().split())
        child.wait()
        events = _collect(listener, lambda ev: any(e.kind == ProcEventKind.EXIT and e.tgid == child.pid for e in ev))
    mine = _about(events, {child.pid})
    forks = [e for e in mine if e.kind == ProcEventKind.FORK]
    thread_forks = [e for e in forks if e.pid == thread_tid]
    assert len(thread_forks) == 1 and not thread_forks[0].is_new_process
    assert main_tid == child.pid
    execs = [e for e in mine if e.kind == ProcEventKind.EXEC]
    # The exec from the non-main thread is reported with pid == tgid: it took over the group.
    assert execs[-1].pid == execs[-1].tgid == child.pid


def test_overflow_raises_events_lost_and_listening_continues() -> None:
    with ProcEventListener(receive_buffer_bytes=16384) as listener:
        for _ in range(64):
            subprocess.run(["/bin/true"], check=True)
        with pytest.raises(EventsLost):
            while True:
                if not listener.read(0.05):
                    pytest.fail("64 processes fitted in a 16 KiB receive buffer")
        assert listener.n_overflows == 1
        with contextlib.suppress(EventsLost):
            while listener.read(0.05):
                pass  # drain what was queued before the loss, as a recovering caller does
        child = subprocess.Popen(["/bin/true"])
        child.wait()
        seen: list[ProcEvent] = []
        deadline = time.monotonic() + 10
        # Other processes of the machine may overflow the small buffer again; what matters is
        # that the socket keeps delivering after an overflow.
        while not any(e.kind == ProcEventKind.EXIT and e.tgid == child.pid for e in seen):
            assert time.monotonic() < deadline
            with contextlib.suppress(EventsLost):
                seen.extend(listener.read(0.2))
    assert any(e.kind == ProcEventKind.FORK and e.pid == child.pid for e in seen)


_UNPRIVILEGED = textwrap.dedent(
    """
    import subprocess, time
    from writewatchd._exceptions import AccessDenied
    from writewatchd.kernel.procevents import ProcEventListener, ProcEventKind, proc_events_available
    try:
        listener = ProcEventListener()
    except AccessDenied:
        print("refused", proc_events_available()[0])
        raise SystemExit
    child = subprocess.Popen(["/bin/true"])
    child.wait()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if any(e.kind == ProcEventKind.FORK and e.pid == child.pid for e in listener.read(0.2)):
            print("delivered", proc_events_available()[0])
            raise SystemExit
    print("silent", proc_events_available()[0])
    """
)


def test_without_cap_net_admin_a_listener_is_refused_or_works() -> None:
    """Before Linux 6.6 the connector needs CAP_NET_ADMIN; since, anyone may listen (§8.11).

    Either way a listener never sits silent, and ``proc_events_available`` says which.
    """
    outcome = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", _UNPRIVILEGED],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert outcome in (["refused", "False"], ["delivered", "True"])


def test_shares_memory_tells_a_vfork_child_from_a_fork_child() -> None:
    vforker = subprocess.Popen([str(build_c("vfork_child"))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert vforker.stdin is not None and vforker.stdout is not None
    try:
        parent, child = (int(x) for x in vforker.stdout.readline().split())
        assert parent == vforker.pid
        assert shares_memory(parent, child)
        assert not shares_memory(os.getpid(), child)
    finally:
        vforker.stdin.write("go\n")
        vforker.stdin.close()
        assert vforker.wait() == 0
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    try:
        assert not shares_memory(os.getpid(), pid)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
