"""Races: tick harvests every 1-2 ms against harvest, flush, views, subscribe(resume=...),
evictions and add_ranges/remove_ranges, in seeded random interleavings; every answer exact.

The test thread is the only writer and the only caller, so each write completes before or
after each call, never during one: what every call must answer follows from the log of
writes alone, however the tick harvests fall. ``WRITEWATCH_SOAK=1`` runs many more seeds
and steps.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

import writewatch
from daemonproc import DaemonProcess
from reliability.streamcheck import CheckedSubscription, StreamChecker
from targets import PAGE, CoopTarget
from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb
from writewatch._proto.writewatch.v1.writewatch_pb2_grpc import WriteWatchStub

SOAK = os.environ.get("WRITEWATCH_SOAK") == "1"
SEEDS = range(40) if SOAK else range(4)
N_STEPS = 3000 if SOAK else 600
# The target's buffer: pages [0, N_FIXED) are tracked throughout and written at random;
# [N_FIXED, N_PAGES) is added and removed at random and never written (an added range is
# reported as entirely written, like a write of every page).
N_PAGES = 256
N_FIXED = 192
MAX_RESUMED = 8


class KeepingChecker(StreamChecker):
    """A :class:`StreamChecker` that also keeps every delta, to split them at barriers."""

    def __init__(self, name: str, *, resume: tuple[int, int] | None = None, base_address: int = 0) -> None:
        super().__init__(name, resume=resume, base_address=base_address)
        self.kept: list[writewatch.Delta] = []

    def feed(self, delta: writewatch.Delta) -> None:
        super().feed(delta)
        self.kept.append(delta)


@dataclass
class Model:
    """What the target wrote, cut at the barriers (flush, harvest) the test passed."""

    epoch: int
    barriers: list[tuple[int, set[int]]] = field(default_factory=list)
    """(seq returned by a barrier, pages written since the previous barrier)."""
    since_barrier: set[int] = field(default_factory=set)
    views: dict[str, set[int]] = field(default_factory=dict)
    n_writes: int = 0

    def wrote(self, pages: set[int]) -> None:
        self.since_barrier |= pages
        for name in self.views:
            self.views[name] |= pages
        self.n_writes += len(pages)

    def barrier(self, epoch: int, seq: int) -> None:
        assert epoch == self.epoch
        assert seq >= self.barriers[-1][0], "a barrier went back"
        self.barriers.append((seq, self.since_barrier))
        self.since_barrier = set()

    def written_after(self, seq: int) -> set[int]:
        """Pages written after the barrier that returned ``seq``."""
        pages = set(self.since_barrier)
        for barrier_seq, written in self.barriers:
            if barrier_seq > seq:
                pages |= written
        return pages


def check_barriers(deltas: list[writewatch.Delta], model: Model, target: CoopTarget) -> int:
    """The deltas between two barriers hold exactly the pages written between them.

    A delta merged for a slow reader may span a barrier: the barriers it spans are compared
    together. Returns the number of barriers compared.
    """
    start_seq = model.barriers[0][0]
    received = [d for d in deltas if d.seq > start_seq]
    index, n_compared, pending = 0, 0, set[int]()
    for seq, written in model.barriers[1:]:
        pending |= written
        if any(d.first_seq <= seq < d.seq for d in received):
            continue
        got: set[int] = set()
        while index < len(received) and received[index].seq <= seq:
            assert not received[index].resync
            got |= target.pages(received[index].regions)
            index += 1
        assert got == pending, f"up to seq {seq}: missing {sorted(pending - got)}, extra {sorted(got - pending)}"
        n_compared += 1
        pending = set()
    return n_compared


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the tests that need no special settings."""
    d = DaemonProcess(tmp_path_factory.mktemp("races"), {})
    d.start()
    yield d
    d.stop()


@pytest.fixture
def shared_client(shared_daemon: DaemonProcess) -> Iterator[writewatch.Client]:
    """A client of the module's daemon."""
    with writewatch.Client(shared_daemon.address, timeout_s=20) as c:
        yield c


@pytest.fixture
def target_pages() -> int:
    return N_PAGES


@pytest.mark.parametrize("seed", SEEDS)
def test_random_interleavings_are_exact(shared_client: writewatch.Client, target: CoopTarget, seed: int) -> None:
    client = shared_client
    rng = random.Random(seed)
    tick_ms = 1 + seed % 2
    fixed = (target.base, target.base + N_FIXED * PAGE)
    dynamic = (fixed[1], target.end)
    dynamic_pages = set(range(N_FIXED, N_PAGES))
    session = client.attach(target.pid, ranges=[fixed], uffd_fd=target.uffd_fd, tick_interval_ms=tick_ms)
    stub = WriteWatchStub(client._channel)
    main = CheckedSubscription(session, KeepingChecker("main", base_address=target.base))
    model = Model(epoch=session.flush()[0])
    model.barriers.append((session.flush()[1], set()))
    resumed: list[tuple[CheckedSubscription, int]] = []  # with the seq each resumed after
    dynamic_tracked = False
    counts: dict[str, int] = {}

    def write() -> None:
        first = rng.randrange(N_FIXED)
        if rng.random() < 0.25:
            target.kernel_write(first)
            model.wrote({first})
        else:
            n_pages = min(rng.randrange(1, 6), N_FIXED - first)
            target.write(first, n_pages)
            model.wrote(set(range(first, first + n_pages)))

    def harvest() -> None:
        response = stub.Harvest(pb.HarvestRequest(session_id=session.id))
        if response.HasField("delta"):
            assert (response.delta.epoch, response.delta.seq) == (response.epoch, response.seq)
            got = target.pages(writewatch.decode_regions(response.delta.regions))
            assert got <= model.since_barrier, f"harvest reported unwritten pages {sorted(got - model.since_barrier)}"
        model.barrier(response.epoch, response.seq)

    def flush() -> None:
        model.barrier(*session.flush())

    def create_view() -> None:
        name = f"v{rng.randrange(6)}"
        session.view(name)
        model.views.setdefault(name, set())

    def get_write_watch() -> None:
        if not model.views:
            return
        name = rng.choice(sorted(model.views))
        reset = rng.random() < 0.5
        got = writewatch.View(session, name).get_write_watch(fixed[0], fixed[1] - fixed[0], reset=reset).addresses
        expected = sorted(p for p in model.views[name] if p < N_FIXED)
        assert got == [target.base + p * PAGE for p in expected], f"view {name}"
        if reset:
            model.views[name] -= set(expected)

    def reset_write_watch() -> None:
        if not model.views:
            return
        name = rng.choice(sorted(model.views))
        first, n = rng.randrange(N_FIXED), rng.randrange(1, 32)
        n = min(n, N_FIXED - first)
        writewatch.View(session, name).reset_write_watch(target.base + first * PAGE, n * PAGE)
        model.views[name] -= set(range(first, first + n))

    def delete_view() -> None:
        if not model.views:
            return
        name = rng.choice(sorted(model.views))
        writewatch.View(session, name).delete()
        del model.views[name]

    def subscribe_resumed() -> None:
        if len(resumed) >= MAX_RESUMED:
            return
        seq, _ = rng.choice(model.barriers[-8:])
        checker = StreamChecker(f"resumed@{seq}", resume=(model.epoch, seq), base_address=target.base)
        resumed.append((CheckedSubscription(session, checker), seq))

    def change_ranges() -> None:
        nonlocal dynamic_tracked
        if dynamic_tracked:
            session.remove_ranges([dynamic])
        else:
            session.add_ranges([dynamic])
            # The new range is reported as written: publish that before a removal can drop it.
            model.wrote(dynamic_pages)
            model.barrier(*session.flush())
        dynamic_tracked = not dynamic_tracked

    actions = [
        (write, 40),
        (harvest, 8),
        (flush, 10),
        (create_view, 4),
        (get_write_watch, 8),
        (reset_write_watch, 3),
        (delete_view, 2),
        (subscribe_resumed, 2),
        (change_ranges, 3),
    ]
    functions, weights = zip(*actions, strict=True)
    for _ in range(N_STEPS):
        action = rng.choices(functions, weights)[0]
        if rng.random() < 0.1:
            time.sleep(rng.uniform(0, 0.003))  # let a tick harvest run first
        action()
        counts[action.__name__] = counts.get(action.__name__, 0) + 1
    flush()
    final_seq = model.barriers[-1][0]
    main.wait_for_seq(final_seq, epoch=model.epoch)
    assert isinstance(main.checker, KeepingChecker)
    n_compared = check_barriers(main.checker.kept, model, target)
    main.checker.check_covers(model.written_after(model.barriers[0][0]))
    for subscription, resume_seq in resumed:
        subscription.wait_for_seq(final_seq, epoch=model.epoch)
        subscription.checker.check_covers(model.written_after(resume_seq))
    target.exit()
    for subscription in [main, *(s for s, _ in resumed)]:
        subscription.join()
    assert n_compared >= 10, "merges joined almost every barrier: too little was compared"
    assert model.n_writes > N_STEPS // 2
    print(f"seed {seed}: {counts}, {model.n_writes} writes, {n_compared} barriers compared, {len(resumed)} resumed")


class StalledReader:
    """A raw stream on a channel with a small HTTP/2 window, that stops reading at random:
    the daemon evicts it, and it resumes from its cursor, as the client library does."""

    def __init__(self, address: str, session_id: str, checker: StreamChecker, rng: random.Random) -> None:
        self.channel = grpc.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)])
        self.stub = WriteWatchStub(self.channel)
        self.session_id = session_id
        self.checker = checker
        self.rng = rng
        self.n_evictions = 0
        self.end: pb.SessionEnded | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _request(self) -> pb.SubscribeRequest:
        request = pb.SubscribeRequest(session_id=self.session_id)
        if self.checker.cursor is not None:
            request.resume_epoch, request.resume_seq = self.checker.cursor
        return request

    def _run(self) -> None:
        try:
            while self.end is None:
                assembler = writewatch.FragmentAssembler()
                for response in self.stub.Subscribe(self._request()):
                    if response.HasField("session_ended"):
                        if response.session_ended.reason == pb.END_REASON_EVICTED:
                            self.n_evictions += 1
                        else:
                            self.end = response.session_ended
                        break
                    delta = assembler.add(response.delta)
                    if delta is None:
                        continue
                    self.checker.feed(delta)
                    if self.rng.random() < 0.05:
                        time.sleep(self.rng.uniform(0.2, 0.8))  # stop reading: blocked, then evicted
        except BaseException as exc:
            self.error = exc

    def join(self, timeout_s: float = 60) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the stalled stream did not end"
        if self.error is not None:
            raise self.error
        self.channel.close()


@pytest.mark.parametrize(
    "daemon_env", [{"WRITEWATCHD_SUBSCRIBER_EVICT_AFTER_MS": "100", "WRITEWATCHD_SUBSCRIBER_QUEUE_DELTAS": "2"}]
)
def test_evicted_subscribers_resume_exactly_while_ticks_and_flushes_race(
    client: writewatch.Client, daemon: DaemonProcess
) -> None:
    big = CoopTarget(1 << 15)
    try:
        session = client.attach(big.pid, ranges=[(big.base, big.end)], uffd_fd=big.uffd_fd, tick_interval_ms=2)
        rng = random.Random(5)
        readers = [
            StalledReader(daemon.address, session.id, StreamChecker(f"stalled{i}", base_address=big.base), rng)
            for i in range(2)
        ]
        steady = CheckedSubscription(session, StreamChecker("steady", base_address=big.base))
        written: set[int] = set()
        deadline = time.monotonic() + (30 if SOAK else 4)
        round_index = 0
        while time.monotonic() < deadline or not all(r.n_evictions for r in readers):
            assert time.monotonic() < deadline + 30, "no stalled reader was ever evicted"
            round_index += 1
            # Strided writes make deltas of many regions: a stalled stream blocks quickly.
            written |= big.stride_write(round_index % 2, big.n_pages // 2, 2)
            written |= big.random_writes(round_index, 10)
            if rng.random() < 0.5:
                session.flush()
        epoch, seq = session.flush()
        for reader in readers:
            deadline_s = time.monotonic() + 60
            while reader.checker.cursor is None or reader.checker.cursor[1] < seq:
                assert reader.error is None, reader.error
                assert time.monotonic() < deadline_s, f"{reader.checker.name} stuck at {reader.checker.cursor}"
                time.sleep(0.01)
            reader.checker.check_covers(written)
        steady.wait_for_seq(seq, epoch=epoch)
        steady.checker.check_covers(written)
        big.exit()
        for reader in readers:
            reader.join()
            assert reader.end is not None and reader.end.reason == pb.END_REASON_EXITED
        steady.join()
        n_evictions = sum(r.n_evictions for r in readers)
        print(f"{round_index} rounds, {len(written)} pages, {n_evictions} evictions")
    finally:
        big.kill()


def test_a_view_made_while_ticks_run_never_holds_earlier_writes(
    shared_client: writewatch.Client, target: CoopTarget
) -> None:
    """Writes made just before view() are never in it, even with a tick every millisecond."""
    session = shared_client.attach(
        target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=1
    )
    n_rounds = 400 if SOAK else 80
    for round_index in range(n_rounds):
        target.random_writes(round_index, 4)
        view = session.view(f"r{round_index}")
        after = target.random_writes(10_000 + round_index, 2)
        got = view.get_write_watch(target.base, target.n_pages * PAGE).addresses
        assert got == sorted(target.base + p * PAGE for p in after)
        view.delete()
    assert session.views() == []
