"""Bad input against every RPC of a real daemon: documented status codes only, no crash, no hang.

Hypothesis draws requests mixing valid values (a live session, its target's pages) with bad
ones (unaligned, huge, overlapping, unknown ids, oversized fields); every answer must be in
the RPC's row of :data:`ALLOWED`. Afterwards the daemon must be the same process, healthy,
with the same sessions, no traceback in its log, its fds back to the baseline, and the live
session must still track its target exactly. ``WRITEWATCH_FUZZ_CASES`` sets the number of
drawn requests (default 600; 5,000 or more for a long run).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import writewatch
from daemonproc import DaemonProcess
from targets import NO_TICKS_MS, PAGE, CoopTarget
from writewatch._proto.writewatch.v1.writewatch_pb2_grpc import WriteWatchStub

pb = writewatch.pb
S = grpc.StatusCode
FUZZ_CASES = int(os.environ.get("WRITEWATCH_FUZZ_CASES", "600"))
CALL_TIMEOUT_S = 20

#: The documented answers of each RPC to any request (OK included where a drawn request may be
#: valid). Anything else (INTERNAL, UNKNOWN, UNAVAILABLE, DEADLINE_EXCEEDED: a hang) fails.
ALLOWED: dict[str, set[grpc.StatusCode]] = {
    "CreateSession": {
        S.OK,
        S.INVALID_ARGUMENT,
        S.NOT_FOUND,
        S.PERMISSION_DENIED,
        S.FAILED_PRECONDITION,
        S.RESOURCE_EXHAUSTED,
        S.ALREADY_EXISTS,
    },
    "GetSession": {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND},
    "ListSessions": {S.OK, S.INVALID_ARGUMENT},
    "DeleteSession": {S.INVALID_ARGUMENT, S.NOT_FOUND},  # only ids of no session are drawn
    "AddRanges": {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED},
    "RemoveRanges": {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION},
    "Subscribe": {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.RESOURCE_EXHAUSTED},
    "Harvest": {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION},
    "Flush": {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION},
    "CreateView": {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED},
    "ListViews": {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND},
    "DeleteView": {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION},
    "Scan": {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION},
    "GetWriteWatch": {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED},
    "ResetWriteWatch": {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED},
    "GetDirtyRate": {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND},
    "GetCapabilities": {S.OK},
    "WhoAmI": {S.OK},
}


@dataclass
class World:
    """The daemon under fire and what must survive it."""

    daemon: DaemonProcess
    stub: WriteWatchStub
    target: CoopTarget
    session_id: str
    ended_id: str
    victim: subprocess.Popen[bytes]
    pid_max: int
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    created: list[str] = field(default_factory=list)
    seconds: Counter[str] = field(default_factory=Counter)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    daemon = DaemonProcess(tmp_path_factory.mktemp("fuzz"), {"WRITEWATCHD_MAX_RANGES_PER_SESSION": "64"})
    daemon.start()
    target = CoopTarget(64)
    ended_target = CoopTarget(8)
    victim = subprocess.Popen(["sleep", "600"])
    channel = grpc.insecure_channel(daemon.address)
    try:
        stub = WriteWatchStub(channel)
        live = stub.CreateSession(_coop(target, tick_interval_ms=NO_TICKS_MS), timeout=CALL_TIMEOUT_S)
        ended = stub.CreateSession(_coop(ended_target), timeout=CALL_TIMEOUT_S)
        ended_target.exit()
        deadline = time.monotonic() + 20
        while stub.GetSession(pb.GetSessionRequest(session_id=ended.session_id)).state != pb.SESSION_STATE_ENDED:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # The injection helper lives as long as the daemon: started before the fd baseline.
        warm = stub.CreateSession(
            pb.CreateSessionRequest(pid=victim.pid, attach_mode=pb.ATTACH_MODE_INJECT, auto_ranges=True),
            timeout=CALL_TIMEOUT_S,
        )
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=warm.session_id), timeout=CALL_TIMEOUT_S)
        pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
        yield World(daemon, stub, target, live.session_id, ended.session_id, victim, pid_max)
    finally:
        channel.close()
        victim.kill()
        victim.wait()
        target.kill()
        ended_target.kill()
        daemon.stop()


def _coop(target: CoopTarget, **fields: Any) -> pb.CreateSessionRequest:
    request: dict[str, Any] = {
        "pid": target.pid,
        "attach_mode": pb.ATTACH_MODE_COOPERATIVE,
        "uffd_fd": target.uffd_fd,
        "ranges": [pb.AddressRange(start_address=target.base, end_address=target.end)],
    }
    return pb.CreateSessionRequest(**(request | fields))


# --------------------------------------------------------------------------- strategies

U64 = (1 << 64) - 1


def _addresses(w: World) -> st.SearchStrategy[int]:
    near = st.integers(-8, w.target.n_pages + 8).map(lambda k: w.target.base + k * PAGE)
    return st.one_of(
        near,
        near.map(lambda a: a + 1),  # unaligned
        st.sampled_from([0, PAGE, 1 << 47, (1 << 47) - PAGE, 1 << 63, U64 - PAGE + 1, U64]),
        st.integers(0, U64),
    ).map(lambda a: a % (1 << 64))


def _ranges(w: World) -> st.SearchStrategy[list[pb.AddressRange]]:
    pair = st.tuples(_addresses(w), _addresses(w)).map(lambda p: pb.AddressRange(start_address=p[0], end_address=p[1]))
    return st.one_of(st.lists(pair, max_size=6), st.integers(60, 80).map(lambda n: [_page_range(w, 0, 1)] * n))


def _page_range(w: World, first: int, n_pages: int) -> pb.AddressRange:
    return pb.AddressRange(
        start_address=w.target.base + first * PAGE, end_address=w.target.base + (first + n_pages) * PAGE
    )


def _session_ids(w: World, *, existing: bool = True) -> st.SearchStrategy[str]:
    odd = ["", "s-000000000000", "x" * 10_000, "\u0000", "../../etc/passwd"]
    unknown = st.one_of(st.sampled_from(odd), st.text(max_size=40))
    if not existing:
        return unknown
    # Half the draws name the live session, so requests reach its checks and not only NOT_FOUND.
    return st.one_of(st.just(w.session_id), st.just(w.session_id), st.just(w.ended_id), unknown)


def _text() -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=20), st.sampled_from(["", "x" * 100_000]))


def _requests(w: World) -> st.SearchStrategy[tuple[str, Any]]:
    sid = _session_ids(w)
    u64 = st.one_of(st.sampled_from([0, 1, 4096, U64]), st.integers(0, U64))
    u32 = st.one_of(st.sampled_from([0, 1, 2, 50, 3_600_000, 3_600_001, (1 << 32) - 1]), st.integers(0, (1 << 32) - 1))
    pids = st.sampled_from([0, w.target.pid, w.victim.pid, w.pid_max + 1, (1 << 32) - 1])
    create = st.builds(
        lambda pid, mode, fd, argv, ranges, auto, tick, labels, env, cwd: pb.CreateSessionRequest(
            pid=pid,
            attach_mode=mode,
            argv=argv,
            ranges=ranges,
            auto_ranges=auto,
            tick_interval_ms=tick,
            labels=labels,
            env=env,
            cwd=cwd,
            **({} if fd is None else {"uffd_fd": fd}),
        ),
        pids,
        st.sampled_from([0, 1, 2, 3, 4, 7, (1 << 31) - 1]),
        st.one_of(
            st.none(), st.sampled_from([w.target.uffd_fd, 0, -1, (1 << 31) - 1]), st.integers(-(1 << 31), (1 << 31) - 1)
        ),
        st.one_of(st.just([]), st.lists(_text().map(lambda t: "/nonexistent/" + t), min_size=1, max_size=3)),
        _ranges(w),
        st.booleans(),
        u32,
        st.dictionaries(_text(), _text(), max_size=3),
        st.dictionaries(st.text(min_size=1, max_size=5), _text(), max_size=2),
        st.sampled_from(["", "/nonexistent", "/"]),
    )
    return st.one_of(
        create.map(lambda r: ("CreateSession", r)),
        sid.map(lambda i: ("GetSession", pb.GetSessionRequest(session_id=i))),
        st.builds(
            lambda n, t, e: pb.ListSessionsRequest(page_size=n, page_token=t, include_ended=e),
            u32,
            st.one_of(_text(), sid),
            st.booleans(),
        ).map(lambda r: ("ListSessions", r)),
        _session_ids(w, existing=False).map(lambda i: ("DeleteSession", pb.DeleteSessionRequest(session_id=i))),
        st.builds(lambda i, r: pb.AddRangesRequest(session_id=i, ranges=r), sid, _ranges(w)).map(
            lambda r: ("AddRanges", r)
        ),
        st.builds(lambda i, r: pb.RemoveRangesRequest(session_id=i, ranges=r), sid, _ranges(w)).map(
            lambda r: ("RemoveRanges", r)
        ),
        st.builds(_subscribe, sid, st.one_of(st.none(), u64), st.one_of(st.none(), u64), _ranges(w)).map(
            lambda r: ("Subscribe", r)
        ),
        sid.map(lambda i: ("Harvest", pb.HarvestRequest(session_id=i))),
        sid.map(lambda i: ("Flush", pb.FlushRequest(session_id=i))),
        st.builds(lambda i, v: pb.CreateViewRequest(session_id=i, view_id=v), sid, _text()).map(
            lambda r: ("CreateView", r)
        ),
        sid.map(lambda i: ("ListViews", pb.ListViewsRequest(session_id=i))),
        st.builds(lambda i, v: pb.DeleteViewRequest(session_id=i, view_id=v), sid, _text()).map(
            lambda r: ("DeleteView", r)
        ),
        st.builds(
            lambda i, a, b, m, y, v, rm, mp: pb.ScanRequest(
                session_id=i,
                start_address=a,
                end_address=b,
                category_mask=m,
                category_anyof_mask=y,
                category_inverted=v,
                return_mask=rm,
                max_pages=mp,
            ),
            sid,
            _addresses(w),
            _addresses(w),
            u64,
            u64,
            u64,
            u64,
            u64,
        ).map(lambda r: ("Scan", r)),
        st.builds(
            lambda i, v, a, n, f, c: pb.GetWriteWatchRequest(
                session_id=i, view_id=v, base_address=a, size_bytes=n, flags=f, max_count=c
            ),
            sid,
            _text(),
            _addresses(w),
            u64,
            u32,
            u64,
        ).map(lambda r: ("GetWriteWatch", r)),
        st.builds(
            lambda i, v, a, n: pb.ResetWriteWatchRequest(session_id=i, view_id=v, base_address=a, size_bytes=n),
            sid,
            _text(),
            _addresses(w),
            u64,
        ).map(lambda r: ("ResetWriteWatch", r)),
        sid.map(lambda i: ("GetDirtyRate", pb.GetDirtyRateRequest(session_id=i))),
        st.just(("GetCapabilities", pb.GetCapabilitiesRequest())),
        st.just(("WhoAmI", pb.WhoAmIRequest())),
    )


def _subscribe(
    session_id: str, epoch: int | None, seq: int | None, filters: list[pb.AddressRange]
) -> pb.SubscribeRequest:
    request = pb.SubscribeRequest(session_id=session_id, filter_ranges=filters)
    if epoch is not None:
        request.resume_epoch = epoch
    if seq is not None:
        request.resume_seq = seq
    return request


# --------------------------------------------------------------------------- calling


def _call(w: World, method: str, request: Any) -> tuple[grpc.StatusCode, str]:
    """The status of one call; a stream is read to its first message, then cancelled."""
    rpc = getattr(w.stub, method)
    try:
        if method == "Subscribe":
            stream = rpc(request, timeout=CALL_TIMEOUT_S)
            try:
                first = next(stream)
                assert first.HasField("delta") or first.HasField("session_ended"), first
            except StopIteration:
                pass
            finally:
                stream.cancel()
            return S.OK, ""
        reply = rpc(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        return error.code(), error.details() or ""
    # A drawn request may be valid: its change is undone at once.
    if method == "CreateSession":
        w.created.append(reply.session_id)
        w.stub.DeleteSession(pb.DeleteSessionRequest(session_id=reply.session_id), timeout=CALL_TIMEOUT_S)
    elif method in ("AddRanges", "RemoveRanges") and request.session_id == w.session_id:
        _restore_ranges(w)
    elif method == "CreateView" and reply.created:
        w.stub.DeleteView(pb.DeleteViewRequest(session_id=request.session_id, view_id=request.view_id))
    return S.OK, ""


def _minus(ranges: list[tuple[int, int]], cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` without ``cut`` (half-open intervals)."""
    out = list(ranges)
    for c_start, c_end in cut:
        out = [
            piece
            for start, end in out
            for piece in ((start, min(end, c_start)), (max(start, c_end), end))
            if piece[0] < piece[1]
        ]
    return out


def _restore_ranges(w: World) -> None:
    """Give the live session back exactly its target's buffer after a valid Add/RemoveRanges."""
    info = w.stub.GetSession(pb.GetSessionRequest(session_id=w.session_id), timeout=CALL_TIMEOUT_S)
    tracked = [(r.start_address, r.end_address) for r in info.ranges]
    original = [(w.target.base, w.target.end)]
    for method, ranges in (("RemoveRanges", _minus(tracked, original)), ("AddRanges", _minus(original, tracked))):
        if ranges:
            request = getattr(pb, f"{method}Request")(
                session_id=w.session_id, ranges=[pb.AddressRange(start_address=a, end_address=b) for a, b in ranges]
            )
            getattr(w.stub, method)(request, timeout=CALL_TIMEOUT_S)
            w.counts[(f"{method} (restore)", "OK")] += 1


def _snapshot(w: World) -> list[tuple[str, int, int, list[tuple[int, int]], int]]:
    """What bad input must not change: every session's identity, state, ranges and epoch."""
    sessions = w.stub.ListSessions(pb.ListSessionsRequest(), timeout=CALL_TIMEOUT_S).sessions
    return [
        (s.session_id, s.pid, s.state, [(r.start_address, r.end_address) for r in s.ranges], s.epoch)
        for s in sessions
        if s.session_id not in w.created
    ]


def _healthy(w: World) -> None:
    assert w.daemon.proc is not None and w.daemon.proc.poll() is None, "the daemon died"
    assert w.victim.poll() is None, "a fuzzed injection killed a bystander"
    with grpc.insecure_channel(w.daemon.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    log = w.daemon.log.read_text()
    assert "Traceback" not in log, log[-4000:]


def _tracks_exactly(w: World) -> None:
    w.stub.Harvest(pb.HarvestRequest(session_id=w.session_id), timeout=CALL_TIMEOUT_S)
    for seed in range(3):
        written = w.target.random_writes(1000 + seed, 20)
        reply = w.stub.Harvest(pb.HarvestRequest(session_id=w.session_id), timeout=CALL_TIMEOUT_S)
        assert w.target.pages(writewatch.decode_regions(reply.delta.regions)) == written


def _settled_fds(w: World, baseline: int) -> int:
    """The daemon's fd count once cancelled streams are gone (waits up to 10 s for the baseline)."""
    deadline = time.monotonic() + 10
    while (n := w.daemon.n_fds()) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


# --------------------------------------------------------------------------- tests


def test_drawn_requests_get_documented_answers_and_change_nothing(world: World) -> None:
    w = world
    before = _snapshot(w)
    _tracks_exactly(w)
    baseline_fds = w.daemon.n_fds()

    @settings(
        max_examples=FUZZ_CASES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(_requests(w))
    def fire(drawn: tuple[str, Any]) -> None:
        method, request = drawn
        started = time.monotonic()
        code, details = _call(w, method, request)
        w.seconds[method] += time.monotonic() - started
        w.counts[(method, code.name)] += 1
        assert code in ALLOWED[method], f"{method}({request!r:.300}) -> {code.name}: {details}"

    fire()
    n_fuzzed = sum(w.counts.values())
    print(f"\nfuzzed {n_fuzzed} requests: " + ", ".join(f"{m} {c} x{n}" for (m, c), n in sorted(w.counts.items())))
    print("seconds per RPC: " + ", ".join(f"{m} {t:.2f}" for m, t in w.seconds.most_common()))
    assert n_fuzzed >= FUZZ_CASES
    assert {m for m, _ in w.counts} >= set(ALLOWED), "some RPC was never fuzzed"
    service = pb.DESCRIPTOR.services_by_name["WriteWatch"]
    assert {m.name for m in service.methods} == set(ALLOWED), "an RPC without a row in ALLOWED is not fuzzed"
    _healthy(w)
    assert _snapshot(w) == before
    _tracks_exactly(w)
    n_fds = _settled_fds(w, baseline_fds)
    assert n_fds <= baseline_fds, {
        fd: os.readlink(f"/proc/{w.daemon.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{w.daemon.pid}/fd")
    }


def test_oversized_messages_are_refused_and_nothing_changes(world: World) -> None:
    w = world
    before = _snapshot(w)
    huge = "x" * (17 << 20)  # above the daemon's 16 MiB receive limit
    victim = pb.CreateSessionRequest(pid=w.victim.pid, attach_mode=pb.ATTACH_MODE_INJECT, auto_ranges=True)
    for method, request in [
        ("CreateSession", pb.CreateSessionRequest(pid=w.victim.pid, labels={"k": huge})),
        ("GetSession", pb.GetSessionRequest(session_id=huge)),
        ("ListSessions", pb.ListSessionsRequest(page_token=huge)),
        ("Harvest", pb.HarvestRequest(session_id=huge)),
    ]:
        code, details = _call(w, method, request)
        assert code == S.RESOURCE_EXHAUSTED, (method, code, details)
    # Under the transport's limit, what the daemon would keep for the session's life is bounded.
    for labels in ({"k": "v" * 5000}, {"k" * 5000: "v"}, {f"k{i}": "v" for i in range(1000)}):
        victim.labels.clear()
        victim.labels.update(labels)
        code, details = _call(w, "CreateSession", victim)
        assert code == S.INVALID_ARGUMENT and "labels" in details, (code, details)
    _healthy(w)
    assert _snapshot(w) == before


def test_malformed_and_random_bytes_get_invalid_argument(world: World) -> None:
    w = world
    rng = random.Random(8)
    channel = grpc.insecure_channel(w.daemon.address)
    try:
        for method, allowed in ALLOWED.items():
            raw = channel.unary_unary(f"/writewatch.v1.WriteWatch/{method}")
            for payload in (b"\xff\xff\xff\xff", b"\x0a\x80", bytes(rng.randrange(256) for _ in range(64))):
                try:
                    if method == "Subscribe":
                        stream = channel.unary_stream(f"/writewatch.v1.WriteWatch/{method}")(payload, timeout=5)
                        next(stream)
                        stream.cancel()
                    else:
                        raw(payload, timeout=5)
                except grpc.RpcError as error:
                    assert isinstance(error, grpc.Call)
                    # Random bytes sometimes parse (unknown fields are kept): then the request's
                    # own checks answer, as for any drawn request.
                    assert error.code() in allowed | {S.INVALID_ARGUMENT}, (method, payload, error)
                    if payload[:2] == b"\xff\xff":
                        assert error.code() == S.INVALID_ARGUMENT and "not a valid" in (error.details() or "")
    finally:
        channel.close()
    _healthy(w)


def test_random_bytes_on_the_socket_do_not_hurt_the_daemon(world: World) -> None:
    w = world
    before = _snapshot(w)
    rng = random.Random(6)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    payloads = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4096))) for _ in range(40)]
    payloads += [preface + p for p in payloads[:20]]  # past the HTTP/2 preface: garbage frames
    payloads += [preface + b"\x00\xff\xff\x04\x00\x00\x00\x00\x00" + b"\x00" * 70_000]  # a huge SETTINGS frame
    for payload in payloads:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(w.daemon.socket))
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
            except OSError:
                pass  # the daemon may close the connection while we write: that is the point
    # A half-open connection that never sends anything must not block anyone else.
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(str(w.daemon.socket))
    try:
        _healthy(w)
        assert _snapshot(w) == before
        _tracks_exactly(w)
    finally:
        idle.close()


def test_a_second_session_on_a_tracked_process_is_refused(world: World) -> None:
    """Found by the fuzzer: a second cooperative session on the same uffd took the first's pages."""
    w = world
    before = _snapshot(w)
    for request in (_coop(w.target), _coop(w.target, auto_ranges=True, ranges=[])):
        code, details = _call(w, "CreateSession", request)
        assert code == S.ALREADY_EXISTS and w.session_id in details, (code, details)
    inject = pb.CreateSessionRequest(pid=w.target.pid, attach_mode=pb.ATTACH_MODE_INJECT, auto_ranges=True)
    assert _call(w, "CreateSession", inject)[0] == S.ALREADY_EXISTS
    assert _snapshot(w) == before
    _tracks_exactly(w)


def test_unknown_enum_values_are_invalid_argument(world: World) -> None:
    """Found by the fuzzer: an attach_mode outside the enum was a traceback and INTERNAL."""
    w = world
    for mode in (4, 7, (1 << 31) - 1):
        request = pb.CreateSessionRequest(pid=w.victim.pid, attach_mode=mode, auto_ranges=True)  # type: ignore[arg-type]
        code, details = _call(w, "CreateSession", request)
        assert code == S.INVALID_ARGUMENT and "attach_mode" in details
    _healthy(w)
