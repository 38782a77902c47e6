"""Fleet: two real daemons, real targets; one listing, attach on a chosen host, one merged subscription."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import writewatch
from daemonproc import DaemonProcess
from targets import NO_TICKS_MS, CoopTarget

WRITEWATCH = str(Path(sys.executable).parent / "writewatch")


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[dict[str, DaemonProcess]]:
    started: dict[str, DaemonProcess] = {}
    for name in ("alpha", "beta"):
        directory = tmp_path / name
        directory.mkdir()
        started[name] = DaemonProcess(directory, {})
        started[name].start()
    yield started
    for d in started.values():
        d.stop()


@pytest.fixture
def targets() -> Iterator[list[CoopTarget]]:
    made = [CoopTarget(64), CoopTarget(64)]
    yield made
    for target in made:
        target.kill()


def _attach(fleet: writewatch.Fleet, host: str, target: CoopTarget) -> writewatch.Session:
    return fleet.attach(
        host, target.pid, [(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
    )


def test_sessions_of_every_daemon_in_one_listing_and_attach_on_a_chosen_host(
    daemons: dict[str, DaemonProcess], targets: list[CoopTarget]
) -> None:
    with writewatch.Fleet({name: d.address for name, d in daemons.items()}, timeout_s=7) as fleet:
        assert fleet.hosts == ["alpha", "beta"]
        assert all(client.timeout_s == 7 for client in fleet.clients.values())
        first = _attach(fleet, "beta", targets[0])
        second = _attach(fleet, "alpha", targets[1])
        listed = [(host, session.id, session.snapshot.pid) for host, session in fleet.sessions()]
        assert listed == [("alpha", second.id, targets[1].pid), ("beta", first.id, targets[0].pid)]
        with writewatch.Client(daemons["alpha"].address) as alpha:
            assert [s.id for s in alpha.sessions()] == [second.id]
        with pytest.raises(ValueError, match="no host 'gamma'"):
            fleet.attach("gamma", targets[0].pid)


def test_one_iterator_of_host_and_delta_over_two_daemons(
    daemons: dict[str, DaemonProcess], targets: list[CoopTarget]
) -> None:
    with writewatch.Fleet([d.address for d in daemons.values()]) as fleet:
        hosts = fleet.hosts
        sessions = [_attach(fleet, host, target) for host, target in zip(hosts, targets, strict=True)]
        written: dict[str, set[int]] = {host: set() for host in hosts}
        for round_index in range(5):
            for host, target, session in zip(hosts, targets, sessions, strict=True):
                written[host] |= target.random_writes(10 * round_index + hosts.index(host) + 1, 10)
                session.harvest()
        for target in targets:
            target.exit()
        received: dict[str, set[int]] = {host: set() for host in hosts}
        seqs: dict[str, list[int]] = {host: [] for host in hosts}
        for host, delta in fleet.subscribe([(host, s.id) for host, s in zip(hosts, sessions, strict=True)]):
            seqs[host].append(delta.seq)
            if not delta.resync:
                target = targets[hosts.index(host)]
                received[host] |= target.pages(delta.regions)
    assert received == written
    assert all(s == list(range(1, 7)) for s in seqs.values()), seqs


def test_cli_lists_a_fleet_and_names_the_daemon_it_cannot_reach(
    daemons: dict[str, DaemonProcess], targets: list[CoopTarget], tmp_path: Path
) -> None:
    with writewatch.Fleet({name: d.address for name, d in daemons.items()}) as fleet:
        session = _attach(fleet, "beta", targets[0])
    fleet_file = tmp_path / "fleet.txt"
    lines = [f"{name} {d.address}  # a daemon" for name, d in daemons.items()]
    fleet_file.write_text("# the test fleet\n" + "\n".join(lines) + "\n")
    result = subprocess.run(
        [WRITEWATCH, "sessions", "--fleet", str(fleet_file), "--json"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert [(row["host"], row["session_id"]) for row in json.loads(result.stdout)] == [("beta", session.id)]
    fleet_file.write_text(fleet_file.read_text() + f"gone unix:{tmp_path}/gone.sock\n")
    result = subprocess.run(
        [WRITEWATCH, "sessions", "--fleet", str(fleet_file), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert [row["host"] for row in json.loads(result.stdout)] == ["beta"]
    assert result.stderr.startswith("writewatch: gone: ")
    assert "Traceback" not in result.stderr


def test_fleet_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "fleet.txt"
    path.write_text("a unix:/x\na unix:/y\n")
    with pytest.raises(ValueError, match=r"fleet.txt:2: 'a' is listed twice"):
        writewatch.Fleet.from_file(path)
    path.write_text("a b c\n")
    with pytest.raises(ValueError, match=r"fleet.txt:1: expected ADDRESS or NAME ADDRESS"):
        writewatch.Fleet.from_file(path)
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="names no daemon"):
        writewatch.Fleet.from_file(path)
