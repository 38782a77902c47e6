"""One daemon owns a state dir: a second one is refused and changes nothing; kill -9 + restart re-adopts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import writewatch
from daemonproc import DaemonProcess
from targets import NO_TICKS_MS, CoopTarget


def _files(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file of the directory with its size, mtime and content."""
    return {
        path.name: (path.stat().st_size, path.stat().st_mtime_ns, path.read_bytes())
        for path in sorted(directory.iterdir())
    }


def _harvested_pages(session: writewatch.Session, target: CoopTarget) -> set[int]:
    delta = session.harvest()
    return set() if delta is None else target.pages(delta.regions)


def test_a_second_daemon_is_refused_changes_nothing_and_kill_9_restart_readopts(
    daemon: DaemonProcess, target: CoopTarget, tmp_path: Path
) -> None:
    with writewatch.Client(daemon.address) as client:
        session = client.attach(target.pid, ranges=[(target.base, target.end)], tick_interval_ms=NO_TICKS_MS)
        session.harvest()
        before = session.info()
        files_before = _files(daemon.state_dir)
        assert files_before["writewatchd.lock"][2] == f"{daemon.pid}\n".encode()

        second = DaemonProcess(tmp_path, {}, name="second", state_dir=daemon.state_dir)
        refused = subprocess.run(
            second.command(), check=False, env=second.env, capture_output=True, text=True, timeout=30
        )
        assert refused.returncode != 0
        for needed in (str(daemon.state_dir), f"pid {daemon.pid}", "--state-dir"):
            assert needed in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
        assert not second.socket.exists()
        assert _files(daemon.state_dir) == files_before

        after = session.info()
        assert (after.state, after.epoch, after.last_seq) == (before.state, before.epoch, before.last_seq)
        target.write(5)
        assert _harvested_pages(session, target) == {5}
        daemon.kill9()
    target.write(6)  # while no daemon runs
    daemon.start()
    assert (daemon.state_dir / "writewatchd.lock").read_text() == f"{daemon.pid}\n"
    with writewatch.Client(daemon.address) as client:
        session = client.session(session.id)
        info = session.info()
        assert info.state == writewatch.pb.SESSION_STATE_ACTIVE and info.epoch != before.epoch
        session.harvest()
        written = target.random_writes(7, 20)
        assert _harvested_pages(session, target) == written


def test_graceful_stop_releases_the_state_dir(daemon: DaemonProcess, tmp_path: Path) -> None:
    assert daemon.stop() == 0
    assert (daemon.state_dir / "writewatchd.lock").read_text() == ""
    other = DaemonProcess(tmp_path, {}, name="other", state_dir=daemon.state_dir)
    other.start()
    try:
        assert (daemon.state_dir / "writewatchd.lock").read_text() == f"{other.pid}\n"
    finally:
        assert other.stop() == 0


def test_a_session_held_elsewhere_is_kept_active_not_ended(
    daemon: DaemonProcess, target: CoopTarget, tmp_path: Path
) -> None:
    ranges = [(target.base, target.end)]
    with writewatch.Client(daemon.address) as client:
        held = client.attach(target.pid, ranges=ranges, tick_interval_ms=NO_TICKS_MS)
    daemon.kill9()
    # While the first daemon is down, a daemon with its own state dir tracks the same memory.
    elsewhere = DaemonProcess(tmp_path / "elsewhere", {}, name="e")
    elsewhere.directory.mkdir()
    elsewhere.start()
    try:
        with writewatch.Client(elsewhere.address) as other_client:
            intruder = other_client.attach(target.pid, ranges=ranges, tick_interval_ms=NO_TICKS_MS)
            daemon.start()
            with writewatch.Client(daemon.address) as client, pytest.raises(writewatch.NotFound):
                client.session(held.id)
            log = daemon.log.read_text()
            assert f"session {held.id} (pid {target.pid}) not re-adopted, its record stays ACTIVE" in log
            assert "another userfaultfd" in log
            intruder.close()
    finally:
        elsewhere.stop()
    # Once the memory is free, a restart re-adopts the session the store kept.
    daemon.stop()
    daemon.start()
    with writewatch.Client(daemon.address) as client:
        session = client.session(held.id)
        assert session.info().state == writewatch.pb.SESSION_STATE_ACTIVE
        session.harvest()
        target.write(9)
        assert _harvested_pages(session, target) == {9}


def test_the_lock_is_not_inherited_by_spawned_targets(daemon: DaemonProcess) -> None:
    with writewatch.Client(daemon.address) as client:
        session = client.spawn(["sleep", "30"], ranges="auto", tick_interval_ms=NO_TICKS_MS)
        pid = session.info().pid
        lock = str(daemon.state_dir / "writewatchd.lock")
        assert all(os.readlink(f"/proc/{pid}/fd/{fd}") != lock for fd in os.listdir(f"/proc/{pid}/fd"))
        session.close()
