"""End to end: `writewatch record` of a real target against a real daemon, replayed from the file."""

from __future__ import annotations

import itertools
import random
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest

import writewatch
from daemonproc import DaemonProcess
from recordings import attach, run_cli, start_recorder
from targets import PAGE, CoopTarget
from writewatch.recording import RecordingStop


@pytest.fixture
def target_pages() -> int:
    return 512


def _key(delta: writewatch.Delta) -> tuple[object, ...]:
    return (delta.epoch, delta.seq, delta.first_seq, delta.resync, delta.regions.tolist())


class Live:
    """A live subscriber on a thread, from the session's current position."""

    def __init__(self, session: writewatch.Session) -> None:
        snapshot = session.info()
        self.deltas: list[writewatch.Delta] = []
        self.error: BaseException | None = None
        self._stream = session.subscribe(resume=(snapshot.epoch, snapshot.last_seq))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.deltas.extend(self._stream)
        except BaseException as exc:
            self.error = exc


def test_a_recording_equals_what_a_live_subscriber_received(
    client: writewatch.Client, daemon: DaemonProcess, target: CoopTarget, tmp_path: Path
) -> None:
    session = attach(client, target)
    live = Live(session)
    path = tmp_path / "live.wwrec"
    recorder = start_recorder(daemon.address, session.id, path)
    written: set[int] = set()
    deadline = time.monotonic() + 3
    seed = 0
    while time.monotonic() < deadline:
        seed += 1
        written |= target.random_writes(seed, 40)
        time.sleep(0.005)
    time.sleep(0.1)  # the last writes are harvested before the target exits
    target.exit()
    _, stderr = recorder.communicate(timeout=30)
    live.thread.join(30)
    assert recorder.returncode == 0, stderr
    assert live.error is None and session.end_reason == writewatch.EndReason.EXITED
    assert "stopped: SESSION_ENDED, session EXITED" in stderr

    recording = writewatch.read_recording(path)
    recorded = list(recording)
    assert len(recorded) > 20
    assert [_key(d) for d in recorded] == [_key(d) for d in live.deltas]
    assert {p for d in recorded for p in target.pages(d.regions)} == written
    assert recording.complete and not recording.truncated
    assert recording.end is not None and recording.end.end_reason == writewatch.pb.END_REASON_EXITED
    assert recording.session.pid == target.pid and recording.session.comm == "coop_target"
    assert [r.tolist() for r in recording.range_snapshots] == [[[target.base, target.end]]]
    assert recording.daemon_version and recording.page_size_bytes == PAGE


def test_a_recording_cut_at_random_bytes_replays_its_whole_records(
    client: writewatch.Client, daemon: DaemonProcess, target: CoopTarget, tmp_path: Path
) -> None:
    session = attach(client, target)
    path = tmp_path / "full.wwrec"
    recorder = start_recorder(daemon.address, session.id, path, "--duration", "1.5")
    for seed in range(60):
        target.random_writes(seed, 20)
        time.sleep(0.01)
    assert recorder.wait(30) == 0
    full = [_key(d) for d in writewatch.read_recording(path)]
    assert len(full) > 10
    data = path.read_bytes()
    header_end = writewatch.read_recording(path)._records_offset
    rng = random.Random(12)
    cut = tmp_path / "cut.wwrec"
    n_truncated = 0
    for size in sorted(rng.sample(range(header_end, len(data)), 40)):
        cut.write_bytes(data[:size])
        recording = writewatch.read_recording(cut)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prefix = [_key(d) for d in recording]
        assert prefix == full[: len(prefix)]
        assert not recording.complete
        n_truncated += recording.truncated
        assert recording.truncated == any(w.category is writewatch.RecordingTruncatedWarning for w in caught)
    assert n_truncated > 0


def test_a_killed_recorder_leaves_a_readable_file(
    client: writewatch.Client, daemon: DaemonProcess, target: CoopTarget, tmp_path: Path
) -> None:
    session = attach(client, target)
    path = tmp_path / "killed.wwrec"
    recorder = start_recorder(daemon.address, session.id, path)
    for seed in range(30):
        target.random_writes(seed, 20)
        time.sleep(0.01)
    time.sleep(0.2)
    recorder.kill()
    recorder.wait(10)
    recording = writewatch.read_recording(path)
    deltas = list(recording)
    assert deltas and not recording.complete
    assert all(b.first_seq == a.seq + 1 for a, b in itertools.pairwise(deltas))


def test_ctrl_c_stops_with_a_complete_file(
    client: writewatch.Client, daemon: DaemonProcess, target: CoopTarget, tmp_path: Path
) -> None:
    session = attach(client, target)
    path = tmp_path / "interrupted.wwrec"
    recorder = start_recorder(daemon.address, session.id, path)
    target.write(1, 3)
    time.sleep(0.3)
    recorder.send_signal(signal.SIGINT)
    _, stderr = recorder.communicate(timeout=20)
    assert recorder.returncode == 0, stderr
    recording = writewatch.read_recording(path)
    deltas = list(recording)
    assert recording.end is not None and recording.end.stop == RecordingStop.INTERRUPTED
    assert {p for d in deltas for p in target.pages(d.regions)} == {1, 2, 3}


def test_a_recording_rides_through_a_daemon_restart_into_a_new_epoch(
    daemon: DaemonProcess, target: CoopTarget, tmp_path: Path
) -> None:
    with writewatch.Client(daemon.address) as client:
        session = attach(client, target)
    path = tmp_path / "restart.wwrec"
    recorder = start_recorder(daemon.address, session.id, path)
    target.write(5)
    time.sleep(0.3)
    daemon.stop()
    target.write(6)  # while no daemon runs: the new epoch's resync covers it
    daemon.start()
    deadline = time.monotonic() + 30
    while len({d.epoch for d in writewatch.read_recording(path)}) < 2:  # the recorder is back
        assert time.monotonic() < deadline, "the recorder did not come back after the restart"
        time.sleep(0.05)
    target.write(7)
    while 7 not in {p for d in writewatch.read_recording(path) for p in target.pages(d.regions) if not d.resync}:
        assert time.monotonic() < deadline, "the write after the restart was not recorded"
        time.sleep(0.05)
    # Every write is in a delta up to this barrier; the harvests of the exit itself may
    # over-report (the target's memory goes away under the scan), so they are not compared.
    with writewatch.Client(daemon.address) as client:
        _, barrier_seq = client.session(session.id).flush()
    target.exit()
    _, stderr = recorder.communicate(timeout=30)
    assert recorder.returncode == 0, stderr
    deltas = list(writewatch.read_recording(path))
    epochs = sorted({d.epoch for d in deltas})
    assert len(epochs) == 2
    first, second = ([d for d in deltas if d.epoch == e] for e in epochs)
    assert {p for d in first for p in target.pages(d.regions)} == {5}
    assert second[0].resync and target.pages(second[0].regions) == set(range(target.n_pages))
    assert {p for d in second[1:] if d.seq <= barrier_seq for p in target.pages(d.regions)} == {7}


def test_an_unknown_session_fails_before_creating_the_file(daemon: DaemonProcess, tmp_path: Path) -> None:
    path = tmp_path / "none.wwrec"
    result = run_cli("--address", daemon.address, "record", "s-nope", "-o", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith("writewatch: NOT_FOUND") and "s-nope" in result.stderr
    assert "Traceback" not in result.stderr
    assert not path.exists()


def test_an_unwritable_output_is_one_clear_line(
    client: writewatch.Client, daemon: DaemonProcess, target: CoopTarget, tmp_path: Path
) -> None:
    session = attach(client, target)
    for output in (tmp_path / "missing-dir" / "r.wwrec", tmp_path):
        result = run_cli("--address", daemon.address, "record", session.id, "-o", str(output), "-d", "1")
        assert result.returncode == 1
        assert result.stderr.startswith("writewatch: [Errno") and str(output) in result.stderr
        assert "Traceback" not in result.stderr


def test_an_ended_session_is_refused_by_name(
    client: writewatch.Client, daemon: DaemonProcess, target: CoopTarget, tmp_path: Path
) -> None:
    session = attach(client, target)
    target.exit()
    deadline = time.monotonic() + 20
    while session.info().state != writewatch.pb.SESSION_STATE_ENDED:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    path = tmp_path / "ended.wwrec"
    result = run_cli("--address", daemon.address, "record", session.id, "-o", str(path))
    assert result.returncode == 1
    assert result.stderr.strip() == f"writewatch: session {session.id} has ended (EXITED): nothing more to record"
    assert not path.exists()
