"""End to end: a real daemon tracking a real target; what subscribers and views receive is exact."""

from __future__ import annotations

import os
import threading
import time

import grpc
import numpy as np
import pytest

import writewatch
from daemonproc import DaemonProcess
from targets import NO_TICKS_MS, PAGE, CoopTarget
from writewatch._proto.writewatch.v1.writewatch_pb2_grpc import WriteWatchStub


@pytest.fixture
def target_pages() -> int:
    return 512


class Collector:
    """Consumes a subscription on a thread; keeps every delta."""

    def __init__(self, session: writewatch.Session, *, pause_after: int = 0, pause_s: float = 0.0) -> None:
        self.deltas: list[writewatch.Delta] = []
        self.error: BaseException | None = None
        self._session = session
        self._pause_after = pause_after
        self._pause_s = pause_s
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for delta in self._session.subscribe():
                self.deltas.append(delta)
                if self._pause_after and len(self.deltas) == self._pause_after:
                    time.sleep(self._pause_s)
        except BaseException as exc:
            self.error = exc

    def wait_for_seq(self, seq: int, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.deltas or self.deltas[-1].seq < seq:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"no delta up to seq {seq}; got {[d.seq for d in self.deltas]}"
            time.sleep(0.01)

    def written_pages(self, target: CoopTarget) -> set[int]:
        return {p for d in self.deltas if not d.resync for p in target.pages(d.regions)}

    def check_sequence(self) -> None:
        """Seqs never repeat and never skip: each delta starts right after the previous one."""
        for before, after in zip(self.deltas, self.deltas[1:], strict=False):
            assert after.epoch == before.epoch
            assert after.first_seq == before.seq + 1, (before, after)


def _attach(client: writewatch.Client, target: CoopTarget, **kwargs: object) -> writewatch.Session:
    return client.attach(target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, **kwargs)


def test_union_of_deltas_equals_what_the_target_wrote(client: writewatch.Client, target: CoopTarget) -> None:
    """10,000 random user- and kernel-mode writes, 100 harvests, 2 subscribers and 1 view at once."""
    session = _attach(client, target)
    subscribers = [Collector(session), Collector(session)]
    view = session.view("win32")
    view.reset_write_watch(target.base, target.n_pages * PAGE)
    logged: set[int] = set()
    last_seq = 0
    for seed in range(1, 101):
        written = target.random_writes(seed, 100)
        logged |= written
        delta = session.harvest()
        if delta is not None:
            last_seq = delta.seq
        result = view.get_write_watch(target.base, target.n_pages * PAGE, max_count=target.n_pages, reset=True)
        assert {(a - target.base) // PAGE for a in result.addresses} == written
        assert result.granularity == PAGE
    for collector in subscribers:
        collector.wait_for_seq(last_seq)
        assert collector.deltas[0].resync  # the epoch starts with every tracked page written
        assert collector.written_pages(target) == logged
        collector.check_sequence()
    info = session.info()
    assert info.statistics.n_harvests >= 100


def test_tick_harvests_deliver_without_asking(client: writewatch.Client, target: CoopTarget) -> None:
    session = _attach(client, target, tick_interval_ms=5)
    collector = Collector(session)
    target.write(42, 3)
    target.kernel_write(100)
    deadline = time.monotonic() + 10
    while collector.written_pages(target) != {42, 43, 44, 100}:
        assert time.monotonic() < deadline, collector.written_pages(target)
        time.sleep(0.01)


class RawSlowReader:
    """A stream read through a bare channel whose HTTP/2 window stays small (no BDP probing),
    so a pause fills it quickly and the daemon has to queue, then merge."""

    def __init__(self, address: str, session_id: str, pause_s: float) -> None:
        self.channel = grpc.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
        self.deltas: list[tuple[int, int, np.ndarray]] = []
        self.error: grpc.RpcError | None = None
        self.end: writewatch.pb.SessionEnded | None = None
        self._call = WriteWatchStub(self.channel).Subscribe(writewatch.pb.SubscribeRequest(session_id=session_id))
        # Set when the daemon ends the call, even while the reader sleeps.
        self.ended = threading.Event()
        self._call.add_done_callback(lambda _: self.ended.set())
        self._pause_s = pause_s
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._read()
        except grpc.RpcError as error:
            self.error = error

    def _read(self) -> None:
        for response in self._call:
            if response.HasField("session_ended"):
                self.end = response.session_ended
                return
            delta = response.delta
            assert delta.n_fragments == 1
            self.deltas.append((delta.first_seq, delta.seq, writewatch.decode_regions(delta.regions)))
            if len(self.deltas) == 1:
                time.sleep(self._pause_s)

    def wait_for_seq(self, seq: int) -> None:
        deadline = time.monotonic() + 20
        while not self.deltas or self.deltas[-1][1] < seq:
            assert time.monotonic() < deadline
            time.sleep(0.01)

    def code(self) -> grpc.StatusCode:
        return self._call.code()

    def details(self) -> str:
        return self._call.details() or ""

    def close(self) -> None:
        self._call.cancel()
        self.channel.close()


@pytest.mark.parametrize("daemon_env", [{"WRITEWATCHD_SUBSCRIBER_QUEUE_DELTAS": "4"}])
def test_subscriber_that_stops_reading_loses_nothing(
    client: writewatch.Client, daemon: DaemonProcess, request: pytest.FixtureRequest
) -> None:
    target = CoopTarget(8192)
    request.addfinalizer(target.kill)
    session = _attach(client, target)
    slow = RawSlowReader(daemon.address, session.id, pause_s=2.0)
    request.addfinalizer(slow.close)
    fast = Collector(session)
    logged: set[int] = set()
    stop = time.monotonic() + 2.5
    seed = 0
    while time.monotonic() < stop:
        seed += 1
        logged |= target.random_writes(seed, 2000)
        session.harvest()
    final_seq = session.info().last_seq
    fast.wait_for_seq(final_seq)
    assert fast.written_pages(target) == logged
    fast.check_sequence()
    slow.wait_for_seq(final_seq)
    slow_pages = {p for first, _, regions in slow.deltas if first > 1 for p in target.pages(regions)}
    assert slow_pages == logged
    assert all(after[0] == before[1] + 1 for before, after in zip(slow.deltas, slow.deltas[1:], strict=False))
    assert any(first < seq for first, seq, _ in slow.deltas), "the stalled stream's deltas were never merged"


def test_reconnect_resumes_without_gap_or_duplicate(client: writewatch.Client, target: CoopTarget) -> None:
    session = _attach(client, target, tick_interval_ms=NO_TICKS_MS)
    first = Collector(session)
    target.write(1)
    cut = session.harvest()
    assert cut is not None
    first.wait_for_seq(cut.seq)
    logged: set[int] = set()
    for seed in range(10):
        logged |= target.random_writes(seed, 10)
        session.harvest()
    resumed: list[writewatch.Delta] = []
    for delta in session.subscribe(resume=(cut.epoch, cut.seq)):
        resumed.append(delta)
        if delta.seq == session.info().last_seq:
            break
    assert resumed[0].first_seq == cut.seq + 1
    assert not any(d.resync for d in resumed)
    assert [d.seq for d in resumed] == list(range(cut.seq + 1, cut.seq + 1 + len(resumed)))
    assert {p for d in resumed for p in target.pages(d.regions)} == logged


def test_target_exit_ends_every_stream(client: writewatch.Client, target: CoopTarget) -> None:
    session = _attach(client, target, tick_interval_ms=5)
    collectors = [Collector(session), Collector(session)]
    for c in collectors:
        c.wait_for_seq(1)
    target.write(5)
    target.exit()
    for c in collectors:
        c.thread.join(10)
        assert not c.thread.is_alive()
        assert c.error is None
    info = session.info()
    assert info.state == writewatch.pb.SESSION_STATE_ENDED
    assert info.end_reason == writewatch.pb.END_REASON_EXITED


def test_delete_releases_every_fd(client: writewatch.Client, daemon: DaemonProcess, target: CoopTarget) -> None:
    client.sessions()  # warm the channel up so the baseline counts its fds
    baseline = daemon.n_fds()
    sessions = [_attach(client, target) for _ in range(1)]
    collector = Collector(sessions[0])
    collector.wait_for_seq(1)
    assert daemon.n_fds() > baseline
    sessions[0].close()
    collector.thread.join(10)
    assert sessions[0].end_reason == writewatch.EndReason.DELETED
    deadline = time.monotonic() + 5
    while daemon.n_fds() != baseline:
        assert time.monotonic() < deadline, (daemon.n_fds(), baseline, os.listdir(f"/proc/{daemon.pid}/fd"))
        time.sleep(0.05)
    with pytest.raises(writewatch.NotFound):
        sessions[0].info()


def test_scan_reports_categories(client: writewatch.Client, target: CoopTarget) -> None:
    session = _attach(client, target)
    target.write(0, 4)
    present = int(writewatch.PageCategory.PRESENT)
    result = session.scan(target.base, target.end, category_mask=present, return_mask=present)
    assert target.pages(result.regions) == {0, 1, 2, 3}
    assert result.categories.tolist() == [present]
    assert result.complete


def test_big_deltas_arrive_in_fragments_and_are_reassembled(
    client: writewatch.Client, request: pytest.FixtureRequest
) -> None:
    target = CoopTarget(1 << 18)  # 1 GiB of address space; every other page written gives 131,072 regions
    request.addfinalizer(target.kill)
    session = _attach(client, target, tick_interval_ms=NO_TICKS_MS)
    collector = Collector(session)
    collector.wait_for_seq(1)
    written = target.stride_write(0, target.n_pages // 2, 2)
    delta = session.harvest()
    assert delta is not None and delta.n_regions == len(written)
    collector.wait_for_seq(delta.seq)
    (streamed,) = [d for d in collector.deltas if d.seq == delta.seq]
    assert np.array_equal(streamed.regions, delta.regions)
    assert target.pages(streamed.regions) == written


@pytest.mark.parametrize(
    "daemon_env", [{"WRITEWATCHD_SUBSCRIBER_EVICT_AFTER_MS": "300", "WRITEWATCHD_SUBSCRIBER_QUEUE_DELTAS": "2"}]
)
def test_a_stuck_subscriber_is_evicted_and_told_so_and_the_others_continue(
    client: writewatch.Client, daemon: DaemonProcess, request: pytest.FixtureRequest
) -> None:
    target = CoopTarget(1 << 16)
    request.addfinalizer(target.kill)
    session = _attach(client, target, tick_interval_ms=NO_TICKS_MS)
    stuck = RawSlowReader(daemon.address, session.id, pause_s=4.0)
    request.addfinalizer(stuck.close)
    healthy = Collector(session)
    healthy.wait_for_seq(1)
    deadline = time.monotonic() + 20
    seed = 0
    while session.info().statistics.n_subscribers > 1:  # the daemon dropped the stuck stream
        assert time.monotonic() < deadline, "the stuck stream was never evicted"
        seed += 1
        target.stride_write(seed % 2, target.n_pages // 2, 2)
        session.harvest()
    target.write(7)
    delta = session.harvest()
    assert delta is not None
    healthy.wait_for_seq(delta.seq)
    healthy.check_sequence()
    stuck.thread.join(20)  # once it reads again it learns why the stream ended
    assert stuck.end is not None and stuck.end.reason == writewatch.pb.END_REASON_EVICTED
    assert "evicted" in stuck.end.message
