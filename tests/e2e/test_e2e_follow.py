"""Following programs through exec and fork: real launcher chains under a real daemon.

Every program is tests/fixtures/tree_writer.c (or a Python launcher that ends in it); each
logs what it writes, and the pages the daemon reports inside its buffer must be exactly
those, and include every page whose bytes changed (read through /proc/PID/mem while the
program waits for its next command).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

import writewatch
from daemonproc import DaemonProcess
from targets import NO_TICKS_MS
from treeprogs import Program, Programs, changed_pages, pages_in, session_of, wait_until
from writewatch import cli
from writewatchd.kernel.procevents import proc_events_available

EVENTS = proc_events_available()[0]
ACTIVE = writewatch.pb.SESSION_STATE_ACTIVE


@pytest.fixture
def programs(tmp_path: Path) -> Iterator[Programs]:
    progs = Programs(tmp_path)
    yield progs
    progs.close()


def client_address(client: writewatch.Client) -> str:
    """The address the test's client is connected to."""
    return str(client.address)


def _first_delta(session: writewatch.Session) -> writewatch.Delta:
    for delta in session.subscribe():
        return delta
    raise AssertionError("the stream ended without a delta")


def check_exact(session: writewatch.Session, program: Program, pages: list[tuple[int, int]]) -> None:
    """Writes ``pages`` ((first, n) runs); the next harvest reports exactly them in the buffer."""
    session.harvest()  # a barrier: what came before (RESYNC, late registrations) is published
    before = program.memory()
    program.written.clear()
    for first, n_pages in pages:
        program.write(first, n_pages)
    after = program.memory()
    delta = session.harvest()
    assert delta is not None, "the writes were not reported"
    reported = pages_in(delta.regions, program)
    assert reported == program.written
    assert changed_pages(before, after) <= reported


def wait_followed(session: writewatch.Session, program: Program, n_execs: int) -> writewatch.pb.Session:
    """Wait until the session tracks ``program`` after ``n_execs`` followed execs; its snapshot."""
    wait_until(
        lambda: session.info().n_execs_followed >= n_execs and session.snapshot.argv[1:2] == [program.tag],
        what=f"session {session.id} to follow the exec into {program.tag}",
    )
    return session.snapshot


def check_new_epoch(session: writewatch.Session, previous_epoch: int) -> int:
    """The session is in a new epoch whose first delta is a RESYNC; returns the epoch."""
    info = session.info()
    assert info.epoch != previous_epoch
    first = _first_delta(session)
    assert (first.epoch, first.seq, first.resync) == (info.epoch, 1, True)
    return int(info.epoch)


@pytest.mark.parametrize(
    "launcher",
    [["/bin/sh", "-c", 'exec "$0" "$@"'], ["env", "A=1"]],
    ids=["sh-c-exec", "env"],
)
def test_spawned_launcher_execs_the_program(client: writewatch.Client, programs: Programs, launcher: list[str]) -> None:
    session = client.spawn([*launcher, *programs.argv("prog")], tick_interval_ms=NO_TICKS_MS)
    epoch0 = session.snapshot.epoch
    prog = programs.wait("prog")
    assert prog.pid == session.snapshot.pid
    info = wait_followed(session, prog, 1)
    assert info.state == ACTIVE
    assert info.comm == "tree_writer" and info.follow_exec
    check_new_epoch(session, epoch0)
    check_exact(session, prog, [(0, 3), (10, 1), (63, 1)])
    # A second exec, by the program itself, under a live stream: the stream goes on into
    # another epoch, which starts with a RESYNC; again exact.
    epoch1 = session.info().epoch
    streamed: list[writewatch.Delta] = []
    stream = threading.Thread(target=lambda: streamed.extend(session.subscribe()), daemon=True)
    stream.start()
    wait_until(lambda: bool(streamed), what="the stream's first delta")
    prog.send("exec again")
    again = programs.wait("again")
    wait_followed(session, again, 2)
    epoch2 = check_new_epoch(session, epoch1)
    check_exact(session, again, [(5, 7)])
    wait_until(lambda: any(d.epoch == epoch2 and not d.resync for d in streamed), what="the new epoch's writes")
    in_new_epoch = [d for d in streamed if d.epoch == epoch2]
    assert in_new_epoch[0].resync and in_new_epoch[0].seq == 1
    assert [d.epoch for d in streamed] == sorted(d.epoch for d in streamed)  # epochs are time-ordered
    assert pages_in(in_new_epoch[-1].regions, again) == again.written
    session.close()
    stream.join(10)
    assert not stream.is_alive()


def test_exec_from_a_non_main_thread_is_followed(client: writewatch.Client, programs: Programs) -> None:
    session = client.spawn(programs.argv("main"), tick_interval_ms=NO_TICKS_MS)
    prog = programs.wait("main")
    check_exact(session, prog, [(1, 1)])
    epoch0 = session.info().epoch
    prog.send("texec fromthread")
    new = programs.wait("fromthread")
    assert new.pid == prog.pid
    wait_followed(session, new, 1)
    check_new_epoch(session, epoch0)
    check_exact(session, new, [(2, 2), (40, 1)])
    session.close()


def test_follow_exec_false_ends_execed(client: writewatch.Client, programs: Programs) -> None:
    session = client.spawn(programs.argv("first"), follow_exec=False, tick_interval_ms=NO_TICKS_MS)
    prog = programs.wait("first")
    prog.send("exec second")
    programs.wait("second")
    wait_until(lambda: session.info().state != ACTIVE, what="the session to end")
    assert session.snapshot.end_reason == writewatch.EndReason.EXECED
    assert session.snapshot.n_execs_followed == 0


def test_attach_follows_exec(client: writewatch.Client, programs: Programs) -> None:
    proc = subprocess.Popen(programs.argv("attached"))
    try:
        prog = programs.wait("attached")
        session = client.attach(prog.pid, tick_interval_ms=NO_TICKS_MS)
        check_exact(session, prog, [(0, 1)])
        epoch0 = session.info().epoch
        prog.send("exec reborn")
        new = programs.wait("reborn")
        wait_followed(session, new, 1)
        check_new_epoch(session, epoch0)
        check_exact(session, new, [(7, 3)])
        session.close()
    finally:
        proc.kill()
        proc.wait()


_PY_LAUNCHER = textwrap.dedent(
    """
    import os, sys
    writer, sock = sys.argv[1], sys.argv[2]
    pid = os.fork()
    if pid == 0:
        os.execv(writer, [writer, "forked", sock])
    os.execv(writer, [writer, "launcher", sock])
    """
)


def test_python_launcher_forks_a_child_and_both_exec(client: writewatch.Client, programs: Programs) -> None:
    session = client.spawn(
        [sys.executable, "-c", _PY_LAUNCHER, str(programs.binary), programs.path],
        follow_children=True,
        labels={"game": "demo"},
        tick_interval_ms=NO_TICKS_MS,
    )
    root_id = session.id
    parent = programs.wait("launcher")
    child = programs.wait("forked")
    wait_followed(session, parent, 1)
    wait_until(lambda: any(s.snapshot.pid == child.pid for s in client.sessions()), what="the child's session")
    child_session = session_of(client, child.pid)
    info = wait_followed(child_session, child, 0)
    assert info.parent_session_id == root_id
    assert dict(info.labels) == {"game": "demo"}
    assert info.follow_children and info.tick_interval_ms == NO_TICKS_MS
    first = _first_delta(child_session)
    assert first.resync and first.seq == 1
    check_exact(session, parent, [(0, 2)])
    check_exact(child_session, child, [(30, 4)])
    shown = CliRunner().invoke(cli.app, ["sessions", "--tree", "--json", "--address", client_address(client)])
    assert shown.exit_code == 0, shown.output
    rows = [(row["depth"], row["session_id"]) for row in json.loads(shown.output)]
    assert rows == [(0, root_id), (1, child_session.id)]
    table = CliRunner().invoke(
        cli.app, ["sessions", "--tree", "--address", client_address(client)], env={"COLUMNS": "200"}
    )
    assert f"└ {child_session.id}" in table.output
    session.close(recursive=True)
    assert not [s for s in client.sessions() if s.id in (root_id, child_session.id)]


class TestPollingFallback:
    """Without process events: execs and children are found by polling /proc."""

    @pytest.fixture
    def daemon_env(self) -> dict[str, str]:
        return {"WRITEWATCHD_PROCESS_EVENTS": "false", "WRITEWATCHD_PROCESS_POLL_INTERVAL_MS": "50"}

    def test_launcher_tree_by_polling(
        self, client: writewatch.Client, programs: Programs, daemon: DaemonProcess
    ) -> None:
        test_python_launcher_forks_a_child_and_both_exec(client, programs)
        assert "polling /proc" in daemon.log.read_text()


def test_three_level_tree_and_recursive_close(client: writewatch.Client, programs: Programs) -> None:
    client.spawn(programs.argv("a"), follow_children=True, tick_interval_ms=NO_TICKS_MS)
    a = programs.wait("a")
    a.command("child b")
    b = programs.wait("b")
    wait_until(lambda: any(s.snapshot.pid == b.pid for s in client.sessions()), what="b's session")
    b.command("child c")
    c = programs.wait("c")
    wait_until(lambda: any(s.snapshot.pid == c.pid for s in client.sessions()), what="c's session")
    sa, sb, sc = (session_of(client, p.pid) for p in (a, b, c))
    wait_followed(sb, b, 0)
    wait_followed(sc, c, 0)
    assert (sb.snapshot.parent_session_id, sc.snapshot.parent_session_id) == (sa.id, sb.id)
    for session, program, pages in ((sa, a, [(0, 1)]), (sb, b, [(1, 2)]), (sc, c, [(3, 3)])):
        check_exact(session, program, pages)
    # The root's exit leaves its descendants tracked.
    a.send("q")
    wait_until(lambda: sa.info().state != ACTIVE, what="the root's session to end")
    assert sa.snapshot.end_reason == writewatch.EndReason.EXITED
    assert sb.info().state == ACTIVE and sc.info().state == ACTIVE
    check_exact(sc, c, [(9, 1)])
    # Closing a middle session recursively closes its subtree.
    sb.close(recursive=True)
    remaining = {s.id for s in client.sessions()}
    assert sb.id not in remaining and sc.id not in remaining


def test_vfork_then_exec_child_is_adopted_after_its_exec(client: writewatch.Client, programs: Programs) -> None:
    root = client.spawn(programs.argv("vparent"), follow_children=True, tick_interval_ms=NO_TICKS_MS)
    parent = programs.wait("vparent")
    parent.command("vfork vchild")
    child = programs.wait("vchild")
    wait_until(lambda: any(s.snapshot.pid == child.pid for s in client.sessions()), what="the vfork child's session")
    child_session = session_of(client, child.pid)
    assert child_session.snapshot.parent_session_id == root.id
    check_exact(child_session, child, [(4, 4)])
    check_exact(root, parent, [(8, 1)])
    root.close(recursive=True)


class TestLimits:
    @pytest.fixture
    def daemon_env(self) -> dict[str, str]:
        return {"WRITEWATCHD_MAX_SESSIONS_PER_TREE": "3"}

    def test_fork_bomb_is_capped_per_tree(
        self, client: writewatch.Client, programs: Programs, daemon: DaemonProcess
    ) -> None:
        root = client.spawn(programs.argv("bomber"), follow_children=True, tick_interval_ms=NO_TICKS_MS)
        bomber = programs.wait("bomber")
        bomber.command("bomb 12")
        wait_until(lambda: "RESOURCE_EXHAUSTED" in daemon.log.read_text(), what="the tree limit to be logged")
        wait_until(lambda: len(client.sessions()) == 3, what="2 child sessions")
        tree = client.sessions()
        assert {s.snapshot.parent_session_id for s in tree} == {"", root.id}
        # The daemon stays responsive and exact for the root.
        check_exact(root, bomber, [(12, 2)])
        root.close(recursive=True)
        assert client.sessions() == []


@pytest.mark.skipif(not EVENTS, reason="needs process events")
def test_restart_readopts_a_followed_tree(client: writewatch.Client, programs: Programs, daemon: DaemonProcess) -> None:
    root = client.spawn(programs.argv("r"), follow_children=True, tick_interval_ms=NO_TICKS_MS)
    r = programs.wait("r")
    r.command("child rc")
    rc = programs.wait("rc")
    wait_until(lambda: len(client.sessions()) == 2, what="the child's session")
    child_id = session_of(client, rc.pid).id
    daemon.stop()
    daemon.start()
    with writewatch.Client(daemon.address, timeout_s=20) as again:
        sessions = {s.id: s for s in again.sessions()}
        assert set(sessions) == {root.id, child_id}
        assert sessions[child_id].snapshot.parent_session_id == root.id
        assert sessions[root.id].snapshot.follow_children
        check_exact(sessions[child_id], rc, [(2, 1)])
        # Following continues after the restart: a new child of the re-adopted root.
        r.command("child late")
        late = programs.wait("late")
        wait_until(lambda: any(s.snapshot.pid == late.pid for s in again.sessions()), what="the late child's session")
        assert session_of(again, late.pid).snapshot.parent_session_id == root.id
        again.session(root.id).close(recursive=True)


def test_exec_into_a_set_user_id_program_ends_the_session_untouched(
    client: writewatch.Client, programs: Programs
) -> None:
    # /tmp is not mounted nosuid here; the directory must be searchable by uid 65534.
    directory = Path(tempfile.mkdtemp(prefix="ww-suid-", dir="/tmp"))
    try:
        directory.chmod(0o755)
        suid = directory / "suid_writer"
        shutil.copy(programs.binary, suid)
        os.chown(suid, 0, 0)
        suid.chmod(0o4755)
        session = client.spawn(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(suid), "suid", programs.path],
            tick_interval_ms=NO_TICKS_MS,
        )
        prog = programs.wait("suid")
        wait_until(lambda: session.info().state != ACTIVE, what="the session to end")
        assert session.snapshot.end_reason == writewatch.EndReason.EXECED
        assert "set-user-ID" in session.snapshot.end_message
        # Nothing half attached: the program holds no userfaultfd and runs on.
        fds = [os.readlink(f"/proc/{prog.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{prog.pid}/fd")]
        assert not [fd for fd in fds if "userfaultfd" in fd]
        prog.write(0)
    finally:
        shutil.rmtree(directory)
