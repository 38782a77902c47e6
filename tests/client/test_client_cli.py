"""The writewatch CLI against the fake servicer (typer's CliRunner)."""

from __future__ import annotations

import json

import grpc
import pytest
import typer
from fake_writewatch import EPOCH, SESSION_ID, Abort, FakeWriteWatch, delta, ended
from typer.testing import CliRunner

import writewatch
from writewatch import cli
from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb
from writewatch.regions import encode_regions

runner = CliRunner()


def run_json(address: str, *args: str) -> object:
    result = runner.invoke(cli.app, ["--address", address, *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_sessions_json(address: str, fake: FakeWriteWatch) -> None:
    fake.sessions[SESSION_ID].labels["team"] = "db"
    fake.sessions[SESSION_ID].ranges.add(start_address=0x7F0000000000, end_address=0x7F0000100000)
    (session,) = run_json(address, "sessions")  # type: ignore[misc]
    assert session["session_id"] == SESSION_ID
    assert session["pid"] == 4242
    assert session["state"] == "SESSION_STATE_ACTIVE"
    assert session["labels"] == {"team": "db"}
    assert session["ranges"] == [{"start_address": 0x7F0000000000, "end_address": 0x7F0000100000}]
    assert session["statistics"]["n_harvests"] == 0


def test_sessions_all_asks_for_ended_ones(address: str, fake: FakeWriteWatch) -> None:
    run_json(address, "sessions")
    run_json(address, "sessions", "--all")
    assert [r.include_ended for r in fake.requests["ListSessions"]] == [False, True]


def test_flush_prints_epoch_and_seq(address: str, fake: FakeWriteWatch) -> None:
    fake.sessions[SESSION_ID].last_seq = 8
    assert run_json(address, "flush", SESSION_ID) == {"epoch": EPOCH, "seq": 8}


def test_view_create_list_delete(address: str, fake: FakeWriteWatch) -> None:
    for args in (["view", "create", SESSION_ID, "v1"], ["view", "delete", SESSION_ID, "v1"]):
        result = runner.invoke(cli.app, ["-a", address, *args])
        assert result.exit_code == 0, result.output
    fake.views["v2"] = 3
    assert run_json(address, "view", "list", SESSION_ID) == [{"view_id": "v2", "n_pages": 3}]
    result = runner.invoke(cli.app, ["-a", address, "view", "delete", SESSION_ID, "v1"])
    assert result.exit_code == 1 and "no view" in result.output


def test_sessions_table_and_env_address(address: str) -> None:
    result = runner.invoke(cli.app, ["sessions"], env={"WRITEWATCH_ADDRESS": address})
    assert result.exit_code == 0, result.output
    assert SESSION_ID in result.stdout and "ACTIVE" in result.stdout


def test_sizes_in_pages_use_the_daemons_page_size(address: str, fake: FakeWriteWatch) -> None:
    fake.page_size_bytes = 16384
    fake.sessions[SESSION_ID].n_tracked_pages = 64
    fake.scan_response = pb.ScanResponse(
        regions=encode_regions([[0x10000, 0x18000]], page_size_bytes=16384), categories=(2).to_bytes(8, "little")
    )
    listing = runner.invoke(cli.app, ["-a", address, "sessions"], terminal_width=200)
    assert listing.exit_code == 0, listing.output
    assert "1.0 MiB" in listing.stdout  # 64 pages of 16 KiB
    scan = runner.invoke(cli.app, ["-a", address, "scan", SESSION_ID, "0x10000", "0x18000"], terminal_width=200)
    assert scan.exit_code == 0, scan.output
    (row,) = [line.replace("│", " ").split() for line in scan.stdout.splitlines() if "0x10000" in line]
    assert row[:3] == ["0x10000", "0x18000", "2"]  # 32 KiB: 2 pages of 16 KiB


def test_attach_parses_ranges_and_labels(address: str, fake: FakeWriteWatch) -> None:
    data = run_json(
        address, "attach", "1234", "--range", "0x1000-0x3000", "-r", "0x10000+64K", "--uffd-fd", "5", "-l", "k=v"
    )
    (request,) = fake.requests["CreateSession"]
    assert request.attach_mode == pb.ATTACH_MODE_COOPERATIVE and request.uffd_fd == 5
    assert [(r.start_address, r.end_address) for r in request.ranges] == [(0x1000, 0x3000), (0x10000, 0x20000)]
    assert dict(request.labels) == {"k": "v"}
    assert not request.HasField("max_staleness_ms")  # unset: the daemon's default
    assert data["attach_mode"] == "ATTACH_MODE_COOPERATIVE"  # type: ignore[index]


@pytest.mark.parametrize("command", [["attach", "1234", "--auto"], ["spawn", "--auto", "--", "prog"]])
def test_max_staleness_is_passed_as_given_zero_included(address: str, fake: FakeWriteWatch, command: list[str]) -> None:
    for value in ("0", "250"):
        result = runner.invoke(cli.app, ["-a", address, command[0], "--max-staleness-ms", value, *command[1:]])
        assert result.exit_code == 0, result.output
        request = fake.requests["CreateSession"][-1]
        assert request.HasField("max_staleness_ms") and request.max_staleness_ms == int(value)


def test_attach_range_and_auto_conflict(address: str, fake: FakeWriteWatch) -> None:
    result = runner.invoke(cli.app, ["-a", address, "attach", "1", "--range", "0x1000-0x2000", "--auto"])
    assert result.exit_code != 0
    assert "CreateSession" not in fake.requests


def test_spawn_passes_the_command_after_double_dash(address: str, fake: FakeWriteWatch) -> None:
    result = runner.invoke(cli.app, ["-a", address, "spawn", "--label", "x=1", "--", "prog", "-v", "--flag"])
    assert result.exit_code == 0, result.output
    (request,) = fake.requests["CreateSession"]
    assert list(request.argv) == ["prog", "-v", "--flag"]
    assert request.auto_ranges and request.attach_mode == pb.ATTACH_MODE_SPAWN
    assert result.stdout.startswith("s-2\t")


def test_scan_json(address: str, fake: FakeWriteWatch) -> None:
    fake.scan_response = pb.ScanResponse(
        regions=encode_regions([[0x1000, 0x3000]]), categories=(0x0A).to_bytes(8, "little"), complete=True
    )
    data = run_json(address, "scan", SESSION_ID, "0x1000", "1M", "--mask", "present|written", "--max-pages", "9")
    assert data == {
        "regions": [
            {"start_address": 0x1000, "end_address": 0x3000, "categories": 0x0A, "names": ["WRITTEN", "PRESENT"]}
        ],
        "complete": True,
        "resume_address": 0,
    }
    (request,) = fake.requests["Scan"]
    assert (request.category_mask, request.end_address, request.max_pages) == (0x0A, 1 << 20, 9)
    assert request.return_mask == 0x0A


def test_write_watch_json(address: str, fake: FakeWriteWatch) -> None:
    fake.write_watch_addresses = [0x1000, 0x2000, 0x5000]
    data = run_json(address, "write-watch", SESSION_ID, "view1", "0x1000", "16K", "--reset", "--max-count", "2")
    assert data == {"addresses": [0x1000, 0x2000], "granularity_bytes": 4096}
    (request,) = fake.requests["GetWriteWatch"]
    assert (request.view_id, request.size_bytes, request.flags) == ("view1", 16384, pb.WRITE_WATCH_FLAG_RESET)


def test_capabilities_json(address: str) -> None:
    data = run_json(address, "capabilities")
    assert data["kernel_version"] == "6.18.0"  # type: ignore[index]
    assert data["unpopulated_pte_fix"] == "FIX_STATUS_FIXED"  # type: ignore[index]
    assert data["supported_category_mask"] == 0x1FF  # type: ignore[index]


def test_harvest_json(address: str, fake: FakeWriteWatch) -> None:
    assert run_json(address, "harvest", SESSION_ID) is None
    fake.harvest_delta = pb.Delta(epoch=EPOCH, seq=4, regions=encode_regions([[0x4000, 0x6000]]))
    assert run_json(address, "harvest", SESSION_ID) == {
        "epoch": EPOCH,
        "seq": 4,
        "resync": False,
        "n_pages": 2,
        "regions": [[0x4000, 0x6000]],
    }


def test_close(address: str, fake: FakeWriteWatch) -> None:
    result = runner.invoke(cli.app, ["-a", address, "close", SESSION_ID])
    assert result.exit_code == 0, result.output
    assert SESSION_ID not in fake.sessions


@pytest.mark.parametrize("args", [["close", "missing"], ["scan", "missing", "0", "0x1000"]])
def test_errors_are_one_line_without_traceback(address: str, args: list[str]) -> None:
    result = runner.invoke(cli.app, ["-a", address, *args])
    assert result.exit_code == 1
    assert result.stderr.strip() == "writewatch: NOT_FOUND: session 'missing' not found"
    assert "Traceback" not in result.output


def test_permission_error_exit_status(address: str, fake: FakeWriteWatch) -> None:
    fake.errors["CreateSession"] = Abort(grpc.StatusCode.PERMISSION_DENIED, "ptrace denied by yama")
    result = runner.invoke(cli.app, ["-a", address, "attach", "1"])
    assert result.exit_code == 1
    assert "PERMISSION_DENIED: ptrace denied by yama" in result.stderr


def stream_for_watch(fake: FakeWriteWatch) -> None:
    session = fake.sessions[SESSION_ID]
    session.ranges.add(start_address=0x10000, end_address=0x20000)
    session.ranges.add(start_address=0x40000, end_address=0x80000)
    fake.streams = [
        [
            delta(1, [(0x10000, 0x12000), (0x40000, 0x50000)]),
            delta(2, [(0x41000, 0x42000), (0x90000, 0x91000)]),
            ended(pb.END_REASON_EXITED),
        ]
    ]


def test_watch_json_summary(address: str, fake: FakeWriteWatch) -> None:
    stream_for_watch(fake)
    summary = run_json(address, "watch", SESSION_ID, "--seconds", "60")
    assert isinstance(summary, dict)
    assert summary["ended"] is True and summary["end_reason"] == "EXITED"
    assert (summary["n_deltas"], summary["n_regions"], summary["n_pages"]) == (2, 4, 2 + 16 + 1 + 1)
    assert (summary["epoch"], summary["first_seq"], summary["last_seq"]) == (EPOCH, 1, 2)
    assert [(b["start_address"], b["n_pages"]) for b in summary["busiest"]] == [(0x40000, 17), (0x10000, 2), (0, 1)]


def test_watch_table(address: str, fake: FakeWriteWatch) -> None:
    stream_for_watch(fake)
    result = runner.invoke(cli.app, ["-a", address, "watch", SESSION_ID])
    assert result.exit_code == 0, result.output
    assert "busiest range" in result.stdout and "EXITED" in result.stdout


def test_watch_session_function_accepts_a_client(address: str, fake: FakeWriteWatch) -> None:
    stream_for_watch(fake)
    with writewatch.Client(address) as client:
        summary = cli.watch_session(client, SESSION_ID, 60, live=False)
    assert summary["n_pages"] == 20 and summary["size_bytes"] == 20 * 4096


@pytest.mark.parametrize(
    ("text", "value"), [("4096", 4096), ("0x7f00_0000_0000", 0x7F0000000000), ("16M", 16 << 20), ("2KiB", 2048)]
)
def test_parse_number(text: str, value: int) -> None:
    assert cli.parse_number(text) == value


def test_parse_range_and_mask() -> None:
    assert cli.parse_range("0x1000-0x3000") == (0x1000, 0x3000)
    assert cli.parse_range("0x1000+8K") == (0x1000, 0x3000)
    assert cli.parse_mask("PAGE_IS_PRESENT,swapped") == 0x18
    assert cli.parse_mask("0x3") == 3
    with pytest.raises(typer.BadParameter, match="unknown category"):
        cli.parse_mask("DIRTY")
    with pytest.raises(typer.BadParameter, match="not a range"):
        cli.parse_range("0x1000")


@pytest.mark.parametrize(
    ("size_bytes", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 << 20, "5.0 MiB"), (3 << 40, "3.0 TiB")],
)
def test_format_bytes(size_bytes: int, text: str) -> None:
    assert cli.format_bytes(size_bytes) == text
