"""The subscription's sans-IO core, fed messages by hand: cursor, fragments, ends and reconnects."""

from __future__ import annotations

import grpc
import pytest

from writewatch import EndReason, RetryPolicy
from writewatch._core import StreamEnd, SubscriptionState
from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb


class _Failed(grpc.RpcError):
    """A call error as grpc raises it: an RpcError with a status code (a test seam)."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def _delta(epoch: int, seq: int, index: int = 0, n_fragments: int = 1) -> pb.SubscribeResponse:
    return pb.SubscribeResponse(
        delta=pb.Delta(session_id="s", epoch=epoch, seq=seq, fragment_index=index, n_fragments=n_fragments)
    )


def _ended(reason: EndReason, message: str = "") -> pb.SubscribeResponse:
    return pb.SubscribeResponse(session_ended=pb.SessionEnded(reason=int(reason), message=message))  # type: ignore[arg-type]


def _state(resume: tuple[int, int] | None = None, *, reconnect: bool = True, attempts: int = 2) -> SubscriptionState:
    return SubscriptionState("s", resume, [(0, 4096)], reconnect=reconnect, retry=RetryPolicy(max_attempts=attempts))


def test_request_resumes_after_the_cursor_and_keeps_the_filter() -> None:
    state = _state()
    first = state.request()
    assert not first.HasField("resume_epoch") and [r.end_address for r in first.filter_ranges] == [4096]
    assert state.receive(_delta(7, 1)) is not None
    again = state.request()
    assert (again.resume_epoch, again.resume_seq) == (7, 1)
    assert [r.end_address for r in again.filter_ranges] == [4096]


def test_fragments_make_one_delta_with_the_last() -> None:
    state = _state()
    state.request()
    assert state.receive(_delta(1, 1, 0, 2)) is None
    fragments = state.receive(_delta(1, 1, 1, 2))
    assert fragments is not None and [f.fragment_index for f in fragments] == [0, 1]
    assert state.cursor == (1, 1)


def test_a_reopened_stream_drops_the_broken_fragments_and_what_was_delivered() -> None:
    state = _state((3, 5))
    state.request()
    assert state.receive(_delta(3, 5)) is None  # at the resume point: delivered before
    assert state.receive(_delta(3, 6, 0, 2)) is None
    state.request()  # the stream broke in the middle of delta 6
    fragments = state.receive(_delta(3, 6, 0, 1))
    assert fragments is not None and state.cursor == (3, 6)
    assert state.receive(_delta(4, 1)) is not None  # a new epoch
    assert state.cursor == (4, 1)


@pytest.mark.parametrize("reason", [EndReason.EVICTED, EndReason.DAEMON_SHUTDOWN])
def test_resumable_ends_reopen_with_reconnect(reason: EndReason) -> None:
    state = _state()
    state.request()
    assert state.receive(_ended(reason)) is None
    assert state.stream_over and not state.done
    state.closed()
    assert not state.done and state.end is None


@pytest.mark.parametrize("reason", [EndReason.EVICTED, EndReason.DAEMON_SHUTDOWN])
def test_resumable_ends_end_without_reconnect(reason: EndReason) -> None:
    state = _state(reconnect=False)
    state.request()
    state.receive(_ended(reason, "bye"))
    state.closed()
    assert state.done and state.end == StreamEnd(reason, "bye")


def test_a_session_end_is_final() -> None:
    state = _state()
    state.request()
    state.receive(_ended(EndReason.EXITED, "process 1 exited"))
    assert state.stream_over and state.done
    assert state.end == StreamEnd(EndReason.EXITED, "process 1 exited")


def test_a_stream_closed_without_an_end_is_over() -> None:
    state = _state()
    state.request()
    state.closed()
    assert state.done and state.end is None


def test_retry_decisions() -> None:
    state = _state(attempts=2)
    assert state.retry_after_s(_Failed(grpc.StatusCode.UNAVAILABLE)) == RetryPolicy().backoff_s(1)
    assert state.retry_after_s(_Failed(grpc.StatusCode.CANCELLED)) == RetryPolicy().backoff_s(2)
    assert state.retry_after_s(_Failed(grpc.StatusCode.UNAVAILABLE)) is None  # attempts used up
    state.request()
    state.receive(_delta(1, 1))  # a message resets the count
    assert state.retry_after_s(_Failed(grpc.StatusCode.UNAVAILABLE)) is not None
    assert state.retry_after_s(_Failed(grpc.StatusCode.INVALID_ARGUMENT)) is None
    assert _state(reconnect=False).retry_after_s(_Failed(grpc.StatusCode.UNAVAILABLE)) is None
