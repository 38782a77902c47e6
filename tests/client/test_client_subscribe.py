"""Subscribe: fragment reassembly, the cursor, transparent resume, SessionEnded."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from fake_writewatch import EPOCH, FAST_RETRY, SESSION_ID, Abort, FakeWriteWatch, delta, ended

import writewatch
from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb

UNAVAILABLE = Abort(grpc.StatusCode.UNAVAILABLE, "daemon restarting")
PAGE = 4096


@pytest.fixture
def session(address: str) -> Iterator[writewatch.Session]:
    with writewatch.Client(address, timeout_s=10, retry=FAST_RETRY) as client:
        yield client.session(SESSION_ID)


def resume_points(fake: FakeWriteWatch) -> list[tuple[int, int] | None]:
    """The (epoch, seq) each Subscribe call resumed from, None when it did not."""
    points: list[tuple[int, int] | None] = []
    for request in fake.requests["Subscribe"]:
        assert isinstance(request, pb.SubscribeRequest)
        has = request.HasField("resume_epoch")
        assert has == request.HasField("resume_seq")
        points.append((request.resume_epoch, request.resume_seq) if has else None)
    return points


def test_fragments_are_reassembled_and_session_end_stops_iteration(
    session: writewatch.Session, fake: FakeWriteWatch
) -> None:
    fake.streams = [
        [
            delta(1, [(0x1000, 0x2000), (0x5000, 0x7000)], index=0, n_fragments=3, resync=True),
            delta(1, [(0x9000, 0xA000)], index=1, n_fragments=3),
            delta(1, [(0x20000, 0x30000)], index=2, n_fragments=3),
            delta(2, [(0x1000, 0x2000)]),
            ended(pb.END_REASON_EXITED, "exit status 3"),
        ]
    ]
    deltas = list(session.subscribe())
    assert [(d.epoch, d.seq) for d in deltas] == [(EPOCH, 1), (EPOCH, 2)]
    assert deltas[0].regions.tolist() == [[0x1000, 0x2000], [0x5000, 0x7000], [0x9000, 0xA000], [0x20000, 0x30000]]
    assert deltas[0].resync is True
    assert deltas[1].resync is False
    assert deltas[0].n_pages == 1 + 2 + 1 + 16
    assert deltas[1].regions.dtype == np.uint64
    assert session.end_reason is writewatch.EndReason.EXITED
    assert session.end_message == "exit status 3"


def test_reconnect_resumes_after_the_last_complete_delta(session: writewatch.Session, fake: FakeWriteWatch) -> None:
    fake.streams = [
        # seq 2 breaks off after its first fragment: it must not count as received.
        [delta(1, [(0x1000, 0x2000)]), delta(2, [(0x3000, 0x4000)], index=0, n_fragments=2), UNAVAILABLE],
        [
            delta(2, [(0x3000, 0x4000)], index=0, n_fragments=2),
            delta(2, [(0x8000, 0x9000)], index=1, n_fragments=2),
            delta(3, [(0x1000, 0x2000)]),
            ended(),
        ],
    ]
    deltas = list(session.subscribe())
    assert [d.seq for d in deltas] == [1, 2, 3]
    assert deltas[1].regions.tolist() == [[0x3000, 0x4000], [0x8000, 0x9000]]
    assert resume_points(fake) == [None, (EPOCH, 1)]
    assert session.end_reason is writewatch.EndReason.EXITED


def test_replayed_deltas_are_not_delivered_twice(session: writewatch.Session, fake: FakeWriteWatch) -> None:
    fake.streams = [
        [delta(1, [(0x1000, 0x2000)]), delta(2, [(0x1000, 0x2000)]), UNAVAILABLE],
        [delta(2, [(0x1000, 0x2000)]), delta(3, [(0x1000, 0x2000)]), ended()],
    ]
    assert [d.seq for d in session.subscribe()] == [1, 2, 3]
    assert resume_points(fake) == [None, (EPOCH, 2)]


def test_failure_before_any_delta_reopens_like_the_first_stream(
    session: writewatch.Session, fake: FakeWriteWatch
) -> None:
    fake.streams = [[UNAVAILABLE], [delta(1, [(0x1000, 0x2000)]), ended()]]
    assert [d.seq for d in session.subscribe()] == [1]
    assert resume_points(fake) == [None, None]


def test_new_epoch_after_reconnect_is_delivered(session: writewatch.Session, fake: FakeWriteWatch) -> None:
    resync = delta(1, [(0x1000, 0x9000)], resync=True)
    resync.delta.epoch = EPOCH + 1
    fake.streams = [[delta(5, [(0x1000, 0x2000)]), UNAVAILABLE], [resync, ended()]]
    deltas = list(session.subscribe())
    assert [(d.epoch, d.seq, d.resync) for d in deltas] == [(EPOCH, 5, False), (EPOCH + 1, 1, True)]


def test_a_stream_cancelled_by_a_stopping_daemon_is_reopened(session: writewatch.Session, fake: FakeWriteWatch) -> None:
    """After SessionEnded(DAEMON_SHUTDOWN) the reconnect may reach the daemon as it stops: CANCELLED."""
    cancelled = Abort(grpc.StatusCode.CANCELLED, "CANCELLED")
    fake.streams = [[delta(5, [(0x1000, 0x2000)]), ended(pb.END_REASON_DAEMON_SHUTDOWN)], [cancelled], [ended()]]
    assert [d.seq for d in session.subscribe()] == [5]
    assert resume_points(fake) == [None, (EPOCH, 5), (EPOCH, 5)]
    assert session.end_reason is writewatch.EndReason.EXITED


def test_explicit_resume_and_filter_are_sent(session: writewatch.Session, fake: FakeWriteWatch) -> None:
    fake.streams = [[delta(11, [(0x1000, 0x2000)]), ended(pb.END_REASON_DELETED)]]
    deltas = list(session.subscribe(resume=(EPOCH, 10), filter_ranges=[(0x1000, 0x8000)]))
    assert [d.seq for d in deltas] == [11]
    assert resume_points(fake) == [(EPOCH, 10)]
    (request,) = fake.requests["Subscribe"]
    assert [(r.start_address, r.end_address) for r in request.filter_ranges] == [(0x1000, 0x8000)]
    assert session.end_reason is writewatch.EndReason.DELETED


def test_merged_delta_keeps_its_first_seq(session: writewatch.Session, fake: FakeWriteWatch) -> None:
    fake.streams = [[delta(9, [(0x1000, 0x2000)], first_seq=4), ended()]]
    (merged,) = session.subscribe()
    assert (merged.first_seq, merged.seq) == (4, 9)


def test_reconnects_are_bounded(session: writewatch.Session, fake: FakeWriteWatch) -> None:
    fake.streams = [[UNAVAILABLE]] * 10
    with pytest.raises(writewatch.Unavailable, match="daemon restarting"):
        list(session.subscribe())
    assert len(fake.requests["Subscribe"]) == FAST_RETRY.max_attempts + 1


def test_no_reconnect_when_disabled(session: writewatch.Session, fake: FakeWriteWatch) -> None:
    fake.streams = [[delta(1, [(0x1000, 0x2000)]), UNAVAILABLE], [ended()]]
    received = []
    with pytest.raises(writewatch.Unavailable):
        for d in session.subscribe(reconnect=False):
            received.append(d.seq)
    assert received == [1]
    assert len(fake.requests["Subscribe"]) == 1


def test_other_errors_are_not_retried(session: writewatch.Session, fake: FakeWriteWatch) -> None:
    fake.streams = [[Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many subscribers")]]
    with pytest.raises(writewatch.ResourceExhausted, match="too many subscribers"):
        list(session.subscribe())
    assert len(fake.requests["Subscribe"]) == 1


def test_unknown_session_raises_not_found(address: str) -> None:
    with writewatch.Client(address) as client:
        session = writewatch.Session(client, pb.Session(session_id="gone"))
        with pytest.raises(writewatch.NotFound):
            list(session.subscribe(resume=(1, 1)))


def test_out_of_order_fragment_is_a_protocol_error(session: writewatch.Session, fake: FakeWriteWatch) -> None:
    fake.streams = [[delta(1, [(0x1000, 0x2000)], index=1, n_fragments=2)]]
    with pytest.raises(writewatch.ProtocolError, match="expected fragment 0"):
        list(session.subscribe())


def test_stopping_early_cancels_the_stream(session: writewatch.Session, fake: FakeWriteWatch) -> None:
    fake.streams = [[delta(seq, [(0x1000, 0x2000)]) for seq in range(1, 50)] + [ended()]]
    stream = session.subscribe()
    assert next(stream).seq == 1
    stream.close()
    assert session.end_reason is None


async def test_async_subscribe_reassembles_and_resumes(address: str, fake: FakeWriteWatch) -> None:
    fake.streams = [
        [delta(1, [(0x1000, 0x2000)], index=0, n_fragments=2), UNAVAILABLE],
        [
            delta(1, [(0x1000, 0x2000)], index=0, n_fragments=2),
            delta(1, [(0x4000, 0x5000)], index=1, n_fragments=2),
            UNAVAILABLE,
        ],
        [delta(2, [(0x1000, 0x2000)]), ended(pb.END_REASON_EXITED)],
    ]
    async with writewatch.AsyncClient(address, retry=FAST_RETRY) as client:
        session = await client.session(SESSION_ID)
        deltas = [d async for d in session.subscribe()]
    assert [d.seq for d in deltas] == [1, 2]
    assert deltas[0].regions.tolist() == [[0x1000, 0x2000], [0x4000, 0x5000]]
    assert resume_points(fake) == [None, None, (EPOCH, 1)]
    assert session.end_reason is writewatch.EndReason.EXITED
