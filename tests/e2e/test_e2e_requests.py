"""Every bad request gets a precise status and changes nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest

import writewatch
from daemonproc import DaemonProcess
from targets import NO_TICKS_MS, PAGE, CoopTarget
from writewatch._proto.writewatch.v1.writewatch_pb2_grpc import WriteWatchStub

pb = writewatch.pb


@pytest.fixture
def daemon(shared_daemon: DaemonProcess) -> DaemonProcess:
    """Bad requests change nothing, so one daemon serves the whole module."""
    return shared_daemon


@pytest.fixture
def stub(daemon: DaemonProcess) -> Iterator[WriteWatchStub]:
    """The raw stub: requests a friendly client would refuse to build."""
    with grpc.insecure_channel(daemon.address) as channel:
        yield WriteWatchStub(channel)


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert isinstance(error, grpc.Call)
    return error.code(), error.details() or ""


def _create(target: CoopTarget, **fields: object) -> pb.CreateSessionRequest:
    request = {
        "pid": target.pid,
        "attach_mode": pb.ATTACH_MODE_COOPERATIVE,
        "uffd_fd": target.uffd_fd,
        "ranges": [pb.AddressRange(start_address=target.base, end_address=target.end)],
    }
    request.update(fields)
    return pb.CreateSessionRequest(**request)  # type: ignore[arg-type]


def _range(start: int, end: int) -> list[pb.AddressRange]:
    return [pb.AddressRange(start_address=start, end_address=end)]


BAD_CREATES: dict[str, tuple[Callable[[CoopTarget], dict[str, object]], grpc.StatusCode, str]] = {
    "unknown pid": (lambda t: {"pid": 0x3FFFFFF0}, grpc.StatusCode.NOT_FOUND, "does not exist"),
    "pid zero": (lambda t: {"pid": 0}, grpc.StatusCode.INVALID_ARGUMENT, "pid"),
    "not a uffd": (lambda t: {"uffd_fd": 0}, grpc.StatusCode.INVALID_ARGUMENT, "not a userfaultfd"),
    "unaligned": (lambda t: {"ranges": _range(t.base + 1, t.end)}, grpc.StatusCode.INVALID_ARGUMENT, "page"),
    "empty range": (lambda t: {"ranges": _range(t.base, t.base)}, grpc.StatusCode.INVALID_ARGUMENT, "end > start"),
    "overlapping": (
        lambda t: {"ranges": _range(t.base, t.end) + _range(t.base + PAGE, t.base + 2 * PAGE)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "overlap",
    ),
    "no ranges": (lambda t: {"ranges": []}, grpc.StatusCode.INVALID_ARGUMENT, "ranges"),
    "unmapped": (
        lambda t: {"ranges": _range(16 * PAGE, 32 * PAGE)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "cannot be tracked",
    ),
    "tick too long": (lambda t: {"tick_interval_ms": 10**8}, grpc.StatusCode.INVALID_ARGUMENT, "tick_interval_ms"),
    "argv without spawn": (lambda t: {"argv": ["true"]}, grpc.StatusCode.INVALID_ARGUMENT, "argv"),
    "spawn with pid": (
        lambda t: {"attach_mode": pb.ATTACH_MODE_SPAWN, "argv": ["true"]},
        grpc.StatusCode.INVALID_ARGUMENT,
        "pid must be 0",
    ),
}


@pytest.mark.parametrize("case", BAD_CREATES)
def test_bad_create_requests(stub: WriteWatchStub, client: writewatch.Client, target: CoopTarget, case: str) -> None:
    fields, code, words = BAD_CREATES[case]
    request = _create(target, **fields(target))
    got_code, details = _code(lambda: stub.CreateSession(request, timeout=10))
    assert got_code == code, details
    assert words in details
    assert not [s for s in client.sessions() if s.info().pid == target.pid]


def test_spawn_of_a_missing_program(stub: WriteWatchStub, client: writewatch.Client) -> None:
    n_sessions = len(client.sessions())
    request = pb.CreateSessionRequest(attach_mode=pb.ATTACH_MODE_SPAWN, argv=["/nonexistent/prog"], auto_ranges=True)
    code, details = _code(lambda: stub.CreateSession(request, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "cannot spawn" in details
    assert len(client.sessions()) == n_sessions


def test_the_target_is_still_trackable_after_refusals(
    stub: WriteWatchStub, client: writewatch.Client, target: CoopTarget
) -> None:
    for _ in range(3):
        _code(lambda: stub.CreateSession(_create(target, uffd_fd=0), timeout=10))
    session = client.attach(
        target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
    )
    session.harvest()
    target.write(9)
    delta = session.harvest()
    assert delta is not None and target.pages(delta.regions) == {9}


def test_bad_requests_on_a_session_change_nothing(
    stub: WriteWatchStub, client: writewatch.Client, target: CoopTarget
) -> None:
    session = client.attach(
        target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
    )
    session.view("v")
    before = session.info()
    sid = session.id
    outside = target.end + 16 * PAGE
    cases: list[tuple[Callable[[], object], grpc.StatusCode]] = [
        (lambda: stub.GetSession(pb.GetSessionRequest(session_id="s-nope")), grpc.StatusCode.NOT_FOUND),
        (lambda: stub.GetSession(pb.GetSessionRequest(session_id="")), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id="s-nope")), grpc.StatusCode.NOT_FOUND),
        (lambda: stub.Harvest(pb.HarvestRequest(session_id="s-nope")), grpc.StatusCode.NOT_FOUND),
        (
            lambda: stub.GetWriteWatch(
                pb.GetWriteWatchRequest(
                    session_id=sid, view_id="v", base_address=target.base, size_bytes=PAGE, max_count=0
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda: stub.GetWriteWatch(
                pb.GetWriteWatchRequest(
                    session_id=sid, view_id="v", base_address=target.base, size_bytes=PAGE, max_count=1, flags=2
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda: stub.GetWriteWatch(
                pb.GetWriteWatchRequest(
                    session_id=sid, view_id="", base_address=target.base, size_bytes=PAGE, max_count=1
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda: stub.GetWriteWatch(
                pb.GetWriteWatchRequest(
                    session_id=sid,
                    view_id="v",
                    base_address=target.base,
                    size_bytes=target.n_pages * PAGE + PAGE,
                    max_count=1,
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda: stub.ResetWriteWatch(
                pb.ResetWriteWatchRequest(session_id=sid, view_id="v", base_address=outside, size_bytes=PAGE)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda: stub.Scan(pb.ScanRequest(session_id=sid, start_address=target.base + 1, end_address=target.end)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda: stub.Scan(pb.ScanRequest(session_id=sid, start_address=target.end, end_address=target.base)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda: stub.Scan(
                pb.ScanRequest(session_id=sid, start_address=target.base, end_address=target.end, category_mask=1 << 20)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda: stub.AddRanges(
                pb.AddRangesRequest(
                    session_id=sid, ranges=[pb.AddressRange(start_address=target.base, end_address=target.base + PAGE)]
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (lambda: stub.AddRanges(pb.AddRangesRequest(session_id=sid)), grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda: stub.RemoveRanges(
                pb.RemoveRangesRequest(
                    session_id=sid, ranges=[pb.AddressRange(start_address=outside, end_address=outside + PAGE)]
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (lambda: list(stub.Subscribe(pb.SubscribeRequest(session_id="s-nope"))), grpc.StatusCode.NOT_FOUND),
        (
            lambda: list(stub.Subscribe(pb.SubscribeRequest(session_id=sid, resume_epoch=1))),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for call, code in cases:
        got, details = _code(lambda call=call: call())  # type: ignore[misc]
        assert got == code, details
        assert details and "Traceback" not in details
    after = session.info()
    assert after.ranges == before.ranges
    assert after.last_seq == before.last_seq
    assert sid in [s.id for s in client.sessions()]
    target.write(3)
    delta = session.harvest()
    assert delta is not None and target.pages(delta.regions) == {3}


def test_requests_to_an_ended_session(stub: WriteWatchStub, client: writewatch.Client, target: CoopTarget) -> None:
    session = client.attach(
        target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
    )
    target.exit()
    ended = list(session.subscribe())  # the stream replays the epoch, then ends
    assert session.end_reason == writewatch.EndReason.EXITED
    assert ended[0].resync
    code, details = _code(lambda: stub.Harvest(pb.HarvestRequest(session_id=session.id)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "ended" in details
    code, _ = _code(
        lambda: stub.AddRanges(
            pb.AddRangesRequest(
                session_id=session.id, ranges=[pb.AddressRange(start_address=PAGE, end_address=2 * PAGE)]
            )
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert session.info().state == pb.SESSION_STATE_ENDED
