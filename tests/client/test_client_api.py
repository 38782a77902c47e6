"""Client and AsyncClient against the fake servicer: requests, results, status mapping."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from fake_writewatch import EPOCH, SESSION_ID, Abort, FakeWriteWatch

import writewatch
from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb
from writewatch.regions import encode_regions


@pytest.fixture
def client(address: str) -> writewatch.Client:
    with writewatch.Client(address, timeout_s=10) as client:
        yield client


def test_attach_with_uffd_fd_is_cooperative(client: writewatch.Client, fake: FakeWriteWatch) -> None:
    session = client.attach(1234, ranges=[(0x1000, 0x3000)], uffd_fd=7, labels={"app": "x"})
    (request,) = fake.requests["CreateSession"]
    assert request.attach_mode == pb.ATTACH_MODE_COOPERATIVE
    assert request.pid == 1234
    assert request.HasField("uffd_fd") and request.uffd_fd == 7
    assert [(r.start_address, r.end_address) for r in request.ranges] == [(0x1000, 0x3000)]
    assert not request.auto_ranges
    assert session.id == "s-2"
    assert session.snapshot.labels["app"] == "x"


def test_attach_without_fd_injects_and_auto_ranges(client: writewatch.Client, fake: FakeWriteWatch) -> None:
    client.attach(1234, ranges="auto")
    (request,) = fake.requests["CreateSession"]
    assert request.attach_mode == pb.ATTACH_MODE_INJECT
    assert not request.HasField("uffd_fd")
    assert request.auto_ranges and not request.ranges


def test_spawn_sends_argv(client: writewatch.Client, fake: FakeWriteWatch) -> None:
    client.spawn(["prog", "arg"], cwd="/tmp", env={"A": "1"})
    (request,) = fake.requests["CreateSession"]
    assert request.attach_mode == pb.ATTACH_MODE_SPAWN
    assert list(request.argv) == ["prog", "arg"]
    assert request.cwd == "/tmp" and dict(request.env) == {"A": "1"}
    assert request.auto_ranges


def test_bad_ranges_argument_is_rejected_locally(client: writewatch.Client, fake: FakeWriteWatch) -> None:
    with pytest.raises(ValueError, match="auto"):
        client.attach(1, ranges="all")  # type: ignore[arg-type]
    assert "CreateSession" not in fake.requests


def test_sessions_follows_pagination(client: writewatch.Client, fake: FakeWriteWatch) -> None:
    client.attach(1, uffd_fd=3)
    client.attach(2, uffd_fd=3)
    assert [s.id for s in client.sessions()] == [SESSION_ID, "s-2", "s-3"]
    assert len(fake.requests["ListSessions"]) == 3


def test_session_info_and_close(client: writewatch.Client, fake: FakeWriteWatch) -> None:
    session = client.session(SESSION_ID)
    assert session.info().comm == "target"
    with session:
        pass
    assert SESSION_ID not in fake.sessions
    session.close()  # already gone: not an error
    assert len(fake.requests["DeleteSession"]) == 2


def test_harvest(client: writewatch.Client, fake: FakeWriteWatch) -> None:
    session = client.session(SESSION_ID)
    assert session.harvest() is None
    regions = np.array([[0x10000, 0x12000], [0x20000, 0x21000]], dtype=np.uint64)
    fake.harvest_delta = pb.Delta(session_id=SESSION_ID, epoch=EPOCH, seq=9, regions=encode_regions(regions))
    delta = session.harvest()
    assert delta is not None
    assert (delta.epoch, delta.seq, delta.first_seq) == (EPOCH, 9, 9)
    assert np.array_equal(delta.regions, regions)
    assert (delta.n_regions, delta.n_pages, delta.size_bytes) == (2, 3, 3 * 4096)


def test_write_watch_view(client: writewatch.Client, fake: FakeWriteWatch) -> None:
    fake.write_watch_addresses = [0x1000, 0x3000, 0x4000]
    view = client.session(SESSION_ID).view("mine")
    result = view.get_write_watch(0x1000, 0x10000, max_count=2, reset=True)
    assert result.addresses == [0x1000, 0x3000]
    assert result.granularity == 4096 == result.granularity_bytes
    view.reset_write_watch(0x1000, 0x2000)
    (create,) = fake.requests["CreateView"]
    assert (create.session_id, create.view_id) == (SESSION_ID, "mine")
    (get,) = fake.requests["GetWriteWatch"]
    assert (get.view_id, get.base_address, get.size_bytes, get.max_count) == ("mine", 0x1000, 0x10000, 2)
    assert get.flags == pb.WRITE_WATCH_FLAG_RESET
    (reset,) = fake.requests["ResetWriteWatch"]
    assert (reset.view_id, reset.base_address, reset.size_bytes) == ("mine", 0x1000, 0x2000)


def test_views_are_listed_and_deleted(client: writewatch.Client, fake: FakeWriteWatch) -> None:
    session = client.session(SESSION_ID)
    first = session.view("a")
    session.view("b")
    session.view("a")  # idempotent
    assert [(v.view_id, v.n_pages) for v in session.views()] == [("a", 0), ("b", 0)]
    first.delete()
    assert [v.view_id for v in session.views()] == ["b"]
    with pytest.raises(writewatch.NotFound):
        first.delete()


def test_flush_returns_epoch_and_seq(client: writewatch.Client, fake: FakeWriteWatch) -> None:
    fake.sessions[SESSION_ID].last_seq = 41
    assert client.session(SESSION_ID).flush() == (EPOCH, 41)
    (request,) = fake.requests["Flush"]
    assert request.session_id == SESSION_ID


def test_sessions_asks_for_ended_ones_only_when_told(client: writewatch.Client, fake: FakeWriteWatch) -> None:
    client.sessions()
    client.sessions(include_ended=True)
    assert [r.include_ended for r in fake.requests["ListSessions"]] == [False, True]


def test_write_watch_default_count_covers_the_range(client: writewatch.Client, fake: FakeWriteWatch) -> None:
    client.session(SESSION_ID).view("v").get_write_watch(0x1000, 0x10000)
    (request,) = fake.requests["GetWriteWatch"]
    assert request.max_count >= 0x10 and request.flags == 0


def test_scan_returns_regions_and_categories(client: writewatch.Client, fake: FakeWriteWatch) -> None:
    regions = np.array([[0x1000, 0x2000], [0x2000, 0x4000]], dtype=np.uint64)
    categories = np.array([0x0A, 0x12], dtype="<u8")
    fake.scan_response = pb.ScanResponse(
        regions=encode_regions(regions), categories=categories.tobytes(), complete=False, resume_address=0x4000
    )
    present = writewatch.PageCategory.PRESENT
    result = client.session(SESSION_ID).scan(0x1000, 0x9000, category_anyof_mask=present, max_pages=3)
    assert np.array_equal(result.regions, regions)
    assert result.categories.tolist() == [0x0A, 0x12]
    assert not result.complete and result.resume_address == 0x4000
    (request,) = fake.requests["Scan"]
    assert (request.category_anyof_mask, request.max_pages, request.end_address) == (8, 3, 0x9000)
    assert request.return_mask == present  # defaults to the mask and anyof bits


def test_scan_explicit_return_mask(client: writewatch.Client, fake: FakeWriteWatch) -> None:
    client.session(SESSION_ID).scan(0, 0x1000, category_mask=2, return_mask=0)
    (request,) = fake.requests["Scan"]
    assert (request.category_mask, request.return_mask) == (2, 0)


def test_capabilities_and_dirty_rate(client: writewatch.Client) -> None:
    caps = client.capabilities()
    assert caps.pagemap_scan and caps.unpopulated_pte_fix == pb.FIX_STATUS_FIXED
    assert client.session(SESSION_ID).dirty_rate().bytes_per_second == 40960.0


@pytest.mark.parametrize(
    ("code", "exception"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, writewatch.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, writewatch.NotFound),
        (grpc.StatusCode.PERMISSION_DENIED, writewatch.PermissionDenied),
        (grpc.StatusCode.FAILED_PRECONDITION, writewatch.FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, writewatch.ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, writewatch.Unavailable),
        (grpc.StatusCode.INTERNAL, writewatch.Internal),
        (grpc.StatusCode.UNIMPLEMENTED, writewatch.Unimplemented),
    ],
)
def test_status_codes_map_to_exceptions(
    client: writewatch.Client, fake: FakeWriteWatch, code: grpc.StatusCode, exception: type[writewatch.RpcError]
) -> None:
    fake.errors["CreateSession"] = Abort(code, "range 0x1000-0x1800 is not page aligned")
    with pytest.raises(exception) as info:
        client.attach(1, ranges=[(0x1000, 0x1800)], uffd_fd=3)
    assert info.value.code == code
    assert info.value.message == "range 0x1000-0x1800 is not page aligned"
    assert isinstance(info.value, writewatch.RpcError) and isinstance(info.value, writewatch.WriteWatchError)


def test_unknown_session_is_not_found(client: writewatch.Client) -> None:
    with pytest.raises(writewatch.NotFound, match="nope"):
        client.session("nope")


def test_unreachable_daemon_is_unavailable(tmp_path: object) -> None:
    with writewatch.Client("unix:/nonexistent/ww.sock", timeout_s=5) as client, pytest.raises(writewatch.Unavailable):
        client.capabilities()


def test_address_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert writewatch.default_address() == "unix:/run/user/1000/writewatch/writewatchd.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert writewatch.default_address() == "unix:/run/writewatch/writewatchd.sock"
    monkeypatch.setenv("WRITEWATCH_ADDRESS", "/tmp/x.sock")
    with writewatch.Client() as client:
        assert client.address == "unix:/tmp/x.sock"


@pytest.mark.parametrize(
    ("python_enum", "proto_enum", "prefix"),
    [
        (writewatch.AttachMode, pb.AttachMode, "ATTACH_MODE_"),
        (writewatch.EndReason, pb.EndReason, "END_REASON_"),
        (writewatch.PageCategory, pb.PageCategory, "PAGE_CATEGORY_"),
    ],
)
def test_python_enums_mirror_the_proto(python_enum: type, proto_enum: object, prefix: str) -> None:
    proto = {name.removeprefix(prefix): value for name, value in proto_enum.items()}  # type: ignore[attr-defined]
    python = {member.name: member.value for member in python_enum}
    assert python.items() <= proto.items()
    assert set(proto) - set(python) <= {"UNSPECIFIED"}


async def test_async_client(address: str, fake: FakeWriteWatch) -> None:
    async with writewatch.AsyncClient(address, timeout_s=10) as client:
        session = await client.attach(55, uffd_fd=4)
        assert session.id == "s-2"
        assert [s.id for s in await client.sessions()] == [SESSION_ID, "s-2"]
        fake.write_watch_addresses = [0x5000]
        view = await session.view("v")
        result = await view.get_write_watch(0x5000, 0x1000)
        assert result.addresses == [0x5000]
        assert [v.view_id for v in await session.views()] == ["v"]
        await view.delete()
        assert await session.views() == []
        assert await session.flush() == (EPOCH, 0)
        assert (await client.capabilities()).kernel_version == "6.18.0"
        with pytest.raises(writewatch.NotFound):
            await client.session("missing")
        await session.close()
    assert "s-2" not in fake.sessions
