"""flush() is a barrier and views start when view() returns, whatever the 1-2 ms tick harvests do."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

import writewatch
from daemonproc import DaemonProcess
from targets import NO_TICKS_MS, PAGE, CoopTarget
from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb
from writewatch._proto.writewatch.v1.writewatch_pb2_grpc import WriteWatchStub


@pytest.fixture
def client(shared_daemon: DaemonProcess) -> Iterator[writewatch.Client]:
    """A client of the module's daemon (every test here leaves only ended sessions behind)."""
    with writewatch.Client(shared_daemon.address, timeout_s=20) as c:
        yield c


@pytest.fixture
def target_pages() -> int:
    return 256


def _attach(client: writewatch.Client, target: CoopTarget, tick_interval_ms: int) -> writewatch.Session:
    return client.attach(
        target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=tick_interval_ms
    )


class Stream:
    """A subscription consumed on a thread."""

    def __init__(self, session: writewatch.Session) -> None:
        self.deltas: list[writewatch.Delta] = []
        self.error: BaseException | None = None
        self._session = session
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for delta in self._session.subscribe():
                self.deltas.append(delta)
        except BaseException as exc:
            self.error = exc

    def wait_for(self, seq: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.deltas or self.deltas[-1].seq < seq:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"no delta up to seq {seq}"
            time.sleep(0.005)


def check_rounds(
    deltas: list[writewatch.Delta], rounds: list[tuple[int, set[int]]], target: CoopTarget, start_seq: int
) -> int:
    """Each round's writes are exactly the deltas with seq after the previous round's flush up to its own.

    ``rounds`` holds (seq returned by flush, pages written before that flush). A delta merged
    for a slow reader may span a flush; such rounds are compared together. Returns the number
    of rounds compared separately.
    """
    received = [d for d in deltas if d.seq > start_seq]
    for before, after in itertools.pairwise(received):
        assert after.epoch == before.epoch and after.first_seq == before.seq + 1, (before, after)
    n_separate = 0
    index = 0
    previous_seq = start_seq
    pending: set[int] = set()
    for flushed_seq, written in rounds:
        pending |= written
        if any(d.first_seq <= flushed_seq < d.seq for d in received):
            continue  # a merged delta spans this flush: compare with the next round
        got: set[int] = set()
        while index < len(received) and received[index].seq <= flushed_seq:
            assert not received[index].resync
            got |= target.pages(received[index].regions)
            index += 1
        assert got == pending, f"seqs {previous_seq + 1}..{flushed_seq}: missing {pending - got}, extra {got - pending}"
        n_separate += 1
        previous_seq = flushed_seq
        pending = set()
    return n_separate


def test_flush_is_exact_over_hundreds_of_rounds_with_2_ms_ticks(client: writewatch.Client, target: CoopTarget) -> None:
    session = _attach(client, target, tick_interval_ms=2)
    stream = Stream(session)
    epoch, start_seq = session.flush()
    rng = random.Random(8)
    rounds: list[tuple[int, set[int]]] = []
    for round_index in range(300):
        written = target.random_writes(round_index, rng.randrange(0, 12))
        if rng.random() < 0.3:
            time.sleep(rng.uniform(0, 0.004))  # let a tick harvest take the writes first
        flushed_epoch, flushed_seq = session.flush()
        assert flushed_epoch == epoch
        assert flushed_seq >= (rounds[-1][0] if rounds else start_seq)
        rounds.append((flushed_seq, written))
    stream.wait_for(rounds[-1][0])
    n_separate = check_rounds(stream.deltas, rounds, target, start_seq)
    assert n_separate >= 10  # a reader starved for long gets merged deltas that join rounds, never all
    assert sum(len(w) for _, w in rounds) > 1000


def test_harvest_carries_the_flush_position(client: writewatch.Client, target: CoopTarget) -> None:
    session = _attach(client, target, tick_interval_ms=NO_TICKS_MS)
    stub = WriteWatchStub(client._channel)
    target.write(4)
    response = stub.Harvest(pb.HarvestRequest(session_id=session.id))
    assert response.HasField("delta") and (response.epoch, response.seq) == (response.delta.epoch, response.delta.seq)
    again = stub.Harvest(pb.HarvestRequest(session_id=session.id))
    assert not again.HasField("delta") and (again.epoch, again.seq) == (response.epoch, response.seq)
    assert session.flush() == (response.epoch, response.seq)
    target.write(5)
    epoch, seq = session.flush()
    assert (epoch, seq) == (response.epoch, response.seq + 1)
    assert session.harvest() is None  # the flush published the write


def test_flush_of_an_ended_session_is_refused(client: writewatch.Client, target: CoopTarget) -> None:
    session = _attach(client, target, tick_interval_ms=NO_TICKS_MS)
    target.exit()
    for _ in session.subscribe():
        pass
    with pytest.raises(writewatch.FailedPrecondition, match="ended"):
        session.flush()


def test_a_view_sees_exactly_the_writes_after_it_was_made_whatever_the_ticks(
    client: writewatch.Client, target: CoopTarget
) -> None:
    session = _attach(client, target, tick_interval_ms=1)
    target.write(1)  # before the view: never in it
    view = session.view("w")
    target.write(3)
    target.write(5)
    time.sleep(0.2)  # ~200 tick harvests take the writes before the view is asked
    size_bytes = target.n_pages * PAGE
    assert view.get_write_watch(target.base, size_bytes).addresses == [target.base + 3 * PAGE, target.base + 5 * PAGE]
    late = session.view("late")
    time.sleep(0.05)
    assert late.get_write_watch(target.base, size_bytes).addresses == []
    same = session.view("w")  # idempotent: the existing view, unchanged
    assert len(same.get_write_watch(target.base, size_bytes, reset=True).addresses) == 2
    assert view.get_write_watch(target.base, size_bytes).addresses == []
    assert [(v.view_id, v.n_pages) for v in session.views()] == [("late", 0), ("w", 0)]
    late.delete()
    assert [v.view_id for v in session.views()] == ["w"]
    with pytest.raises(writewatch.NotFound, match="no view 'late'"):
        late.get_write_watch(target.base, size_bytes)
    assert session.info().statistics.n_views == 1


def test_views_are_exact_over_many_rounds_with_1_ms_ticks(client: writewatch.Client, target: CoopTarget) -> None:
    session = _attach(client, target, tick_interval_ms=1)
    rng = random.Random(3)
    size_bytes = target.n_pages * PAGE
    n_checked = 0
    for round_index in range(60):
        target.random_writes(1000 + round_index, 5)  # before the view: not in it
        view = session.view(f"v{round_index}")
        written = target.random_writes(round_index, rng.randrange(1, 10))
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0, 0.005))
        got = view.get_write_watch(target.base, size_bytes).addresses
        assert got == sorted(target.base + p * PAGE for p in written)
        n_checked += len(written)
        view.delete()
    assert n_checked > 200


def test_views_come_back_after_a_restart_with_every_page_written(daemon: DaemonProcess, target: CoopTarget) -> None:
    with writewatch.Client(daemon.address) as client:
        session = _attach(client, target, tick_interval_ms=NO_TICKS_MS)
        session.view("kept")
        daemon.kill9()
    daemon.start()
    with writewatch.Client(daemon.address) as client:
        session = client.session(session.id)
        assert [v.view_id for v in session.views()] == ["kept"]
        result = writewatch.View(session, "kept").get_write_watch(target.base, target.n_pages * PAGE, reset=True)
        assert len(result.addresses) == target.n_pages  # a new epoch: like its RESYNC, everything
        target.write(7)
        assert writewatch.View(session, "kept").get_write_watch(target.base, target.n_pages * PAGE).addresses == [
            target.base + 7 * PAGE
        ]


def test_view_requests_are_checked(client: writewatch.Client, target: CoopTarget) -> None:
    session = _attach(client, target, tick_interval_ms=NO_TICKS_MS)
    stub = WriteWatchStub(client._channel)
    cases = [
        (lambda: stub.CreateView(pb.CreateViewRequest(session_id=session.id)), grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda: stub.CreateView(pb.CreateViewRequest(session_id=session.id, view_id="x" * 257)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (lambda: stub.CreateView(pb.CreateViewRequest(session_id="s-nope", view_id="v")), grpc.StatusCode.NOT_FOUND),
        (lambda: stub.DeleteView(pb.DeleteViewRequest(session_id=session.id, view_id="v")), grpc.StatusCode.NOT_FOUND),
        (lambda: stub.ListViews(pb.ListViewsRequest(session_id="s-nope")), grpc.StatusCode.NOT_FOUND),
        (lambda: stub.Flush(pb.FlushRequest(session_id="s-nope")), grpc.StatusCode.NOT_FOUND),
        (lambda: stub.Flush(pb.FlushRequest()), grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda: stub.GetWriteWatch(
                pb.GetWriteWatchRequest(
                    session_id=session.id, view_id="v", base_address=target.base, size_bytes=PAGE, max_count=1
                )
            ),
            grpc.StatusCode.NOT_FOUND,
        ),
    ]
    for call, code in cases:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == code, caught.value.details()
        assert "Traceback" not in (caught.value.details() or "")
    assert session.views() == []


async def test_async_client_views_and_flush(shared_daemon: DaemonProcess, target: CoopTarget) -> None:
    async with writewatch.AsyncClient(shared_daemon.address, timeout_s=20) as client:
        session = await client.attach(
            target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=1
        )
        target.write(2)
        view = await session.view("async")
        target.write(3)
        target.write(5)
        await asyncio.sleep(0.2)
        result = await view.get_write_watch(target.base, target.n_pages * PAGE)
        assert result.addresses == [target.base + 3 * PAGE, target.base + 5 * PAGE]
        target.write(6)
        epoch, seq = await session.flush()
        info = await session.info()
        assert (epoch, seq) == (info.epoch, info.last_seq) and seq >= 2
        assert [(v.view_id, v.n_pages) for v in await session.views()] == [("async", 3)]
        await view.delete()
        assert await session.views() == []
