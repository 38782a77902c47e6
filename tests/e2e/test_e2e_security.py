"""Identities, roles, limits, target policy and the audit trail, from the outside (TCP + TLS, Unix socket)."""

from __future__ import annotations

import grp
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from pki import Pki, needs_openssl, new_token

import writewatch
from daemonproc import DaemonProcess
from targets import NO_TICKS_MS, PAGE, CoopTarget
from writewatch._proto.writewatch.v1.writewatch_pb2_grpc import WriteWatchStub

pytestmark = needs_openssl

pb = writewatch.pb
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


class Secured:
    """A TLS daemon with one token per role and limited/policy-bound tokens, writing an audit log."""

    def __init__(self, directory: Path) -> None:
        self.pki = Pki(directory / "pki")
        self.ca = self.pki.ca("ca")
        server = self.pki.issue("server", self.ca, cn="localhost", san="DNS:localhost")
        self.tokens: dict[str, str] = {}
        blocks = []
        for name, role, extra in [
            ("observer", "reader", ""),
            ("operator", "controller", ""),
            ("root", "admin", ""),
            ("limited", "controller", "max_sessions = 1\nmax_subscribers = 1\nmax_ranges_per_session = 2\n"),
            ("uid-bound", "controller", "target_uids = [4242]\n"),
            ("comm-bound", "controller", 'target_comm = ["coop_*"]\n'),
        ]:
            token, digest = new_token()
            self.tokens[name] = token
            blocks.append(f'[[tokens]]\nname = "{name}"\nsha256 = "{digest}"\nrole = "{role}"\n{extra}')
        self.audit = directory / "audit.log"
        config = directory / "writewatchd.toml"
        config.write_text(
            f'tls_cert_file = "{server.cert}"\ntls_key_file = "{server.key}"\naudit_log = "{self.audit}"\n\n'
            + "\n".join(blocks)
        )
        config.chmod(0o600)
        (directory / "daemon").mkdir()
        self.daemon = DaemonProcess(directory / "daemon", {}, listen="tcp:127.0.0.1:0", config=config)
        self.daemon.start()
        self.address = f"localhost:{self.daemon.port}"

    def client(self, identity: str | None, **kwargs: object) -> writewatch.Client:
        token = self.tokens.get(identity or "", identity)
        return writewatch.Client(self.address, tls_ca_file=self.ca.cert, token=token, timeout_s=20, **kwargs)  # type: ignore[arg-type]

    def audit_lines(self, start: int) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.audit.read_text()[start:].splitlines()]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    s = Secured(tmp_path_factory.mktemp("secured"))
    yield s
    s.daemon.stop()


def _attach(client: writewatch.Client, target: CoopTarget, n_ranges: int = 1) -> writewatch.Session:
    """Attach with ``n_ranges`` ranges, separated by gaps (adjacent ranges merge into one); 1: the whole buffer."""
    if n_ranges == 1:
        return client.attach(
            target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
        )
    size = (target.end - target.base) // (2 * n_ranges) // PAGE * PAGE
    ranges = [(target.base + 2 * i * size, target.base + (2 * i + 1) * size) for i in range(n_ranges)]
    return client.attach(target.pid, ranges=ranges, uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS)


def test_no_token_wrong_token_and_malformed_header_are_unauthenticated(secured: Secured) -> None:
    for identity in (None, "not-a-token"):
        with secured.client(identity) as client, pytest.raises(writewatch.Unauthenticated):
            client.sessions()
    credentials = grpc.ssl_channel_credentials(secured.ca.cert.read_bytes())
    with grpc.secure_channel(secured.address, credentials) as channel, pytest.raises(grpc.RpcError) as info:
        WriteWatchStub(channel).ListSessions(
            pb.ListSessionsRequest(), metadata=[("authorization", "Basic b2JzZXJ2ZXI=")], timeout=10
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert "expected 'Bearer TOKEN'" in info.value.details()  # type: ignore[attr-defined]


def test_reader_observes_but_cannot_control(secured: Secured, target: CoopTarget) -> None:
    with secured.client("operator") as operator, secured.client("observer") as reader:
        session = _attach(operator, target)
        whoami = reader.whoami()
        assert (whoami.identity, whoami.role) == ("observer", pb.ROLE_READER)
        assert session.id in [s.id for s in reader.sessions()]
        seen = reader.session(session.id)
        assert seen.info().pid == target.pid
        first = next(iter(seen.subscribe()))
        assert first.resync and target.pages(first.regions) == set(range(64))
        view = seen.view("mine")  # views are the reader's own state
        target.write(4)
        assert view.get_write_watch(target.base, 64 * PAGE).addresses == [target.base + 4 * PAGE]
        delete = pb.DeleteSessionRequest(session_id=session.id)
        refusals: list[tuple[str, Callable[[], object]]] = [
            ("CreateSession", lambda: _attach(reader, target)),
            ("CreateSession", lambda: reader.spawn(SLEEPER)),
            ("AddRanges", lambda: seen.add_ranges([(target.base, target.base + PAGE)])),
            ("RemoveRanges", lambda: seen.remove_ranges([(target.base, target.base + PAGE)])),
            ("Harvest", seen.harvest),
            ("DeleteSession", lambda: reader._call(reader._stub.DeleteSession, delete)),
        ]
        for method, call in refusals:
            with pytest.raises(writewatch.PermissionDenied) as info:
                call()
            expected = f"token 'observer' (reader) may not call {method}: it needs the role controller"
            assert expected in str(info.value)
        session.close()


def test_controller_controls(secured: Secured, target: CoopTarget) -> None:
    with secured.client("operator") as operator:
        session = _attach(operator, target, n_ranges=2)
        target.write(40)
        delta = session.harvest()
        assert delta is not None and target.pages(delta.regions) == {40}
        session.remove_ranges([(target.base, target.base + 16 * PAGE)])
        assert (
            session.add_ranges([(target.base, target.base + 8 * PAGE)]).ranges[0].end_address == target.base + 8 * PAGE
        )
        session.close()
        spawned = operator.spawn(SLEEPER)
        try:
            assert spawned.info().state == pb.SESSION_STATE_ACTIVE
        finally:
            spawned.close()
            os.kill(spawned.snapshot.pid, signal.SIGKILL)


def test_limits_name_the_limit(secured: Secured, target: CoopTarget) -> None:
    other = CoopTarget(8)
    try:
        with secured.client("limited") as limited:
            with pytest.raises(writewatch.ResourceExhausted, match="limit max_ranges_per_session = 2"):
                _attach(limited, target, n_ranges=4)
            session = _attach(limited, target, n_ranges=2)
            assert len(session.snapshot.ranges) == 2
            with pytest.raises(writewatch.ResourceExhausted, match="limit max_ranges_per_session = 2"):
                session.add_ranges([(target.end - PAGE, target.end)])
            with pytest.raises(writewatch.ResourceExhausted, match=r"limit max_sessions = 1 \(in use: 1\)"):
                limited.attach(other.pid, ranges=[(other.base, other.end)], uffd_fd=other.uffd_fd)
            stream = session.subscribe()
            assert next(stream).resync
            with pytest.raises(writewatch.ResourceExhausted, match="limit max_subscribers = 1"):
                next(iter(session.subscribe()))
            stream.close()
            session.close()
    finally:
        other.kill()


def test_target_policy_names_the_rule(secured: Secured, target: CoopTarget) -> None:
    with secured.client("uid-bound") as uid_bound, secured.client("comm-bound") as comm_bound:
        with pytest.raises(writewatch.PermissionDenied, match=r"owned by uid 0: rule target_uids = \[4242\]"):
            _attach(uid_bound, target)
        session = _attach(comm_bound, target)
        assert session.info().comm == "coop_target"
        # What a policy keeps out, it does not show either.
        assert session.id not in [s.id for s in uid_bound.sessions()]
        with pytest.raises(writewatch.PermissionDenied, match="target_uids"):
            uid_bound.session(session.id)
        with pytest.raises(writewatch.PermissionDenied, match=r"matches no rule target_comm = \['coop_\*'\]"):
            comm_bound.spawn(SLEEPER)
        session.close()


def test_audit_log_has_every_control_action(secured: Secured, target: CoopTarget) -> None:
    start = len(secured.audit.read_text())
    with secured.client("operator") as operator, secured.client("observer") as reader:
        session = _attach(operator, target)
        target.write(2)
        assert session.harvest() is not None
        with pytest.raises(writewatch.PermissionDenied):
            reader.session(session.id).harvest()
        with secured.client("wrong-token") as stranger, pytest.raises(writewatch.Unauthenticated):
            stranger._call(stranger._stub.Harvest, pb.HarvestRequest(session_id=session.id))
        session.close()
        reader.sessions()  # observing is not a control action: no line
    lines = secured.audit_lines(start)
    summary = [(line["method"], line.get("identity"), line["result"]) for line in lines]
    assert summary == [
        ("CreateSession", "operator", "OK"),
        ("Harvest", "operator", "OK"),
        ("Harvest", "observer", "PERMISSION_DENIED"),
        ("Harvest", None, "UNAUTHENTICATED"),
        ("DeleteSession", "operator", "OK"),
    ]
    for line in lines:
        assert line["session_id"] == session.id and line["pid"] == target.pid and line["comm"] == "coop_target"
    assert lines[0]["role"] == "controller" and lines[0]["auth"] == "token" and lines[0]["attach_mode"] == "COOPERATIVE"
    text = secured.audit.read_text()
    assert not any(token in text for token in secured.tokens.values())
    assert stat.S_IMODE(secured.audit.stat().st_mode) == 0o600


def test_unix_socket_caller_is_admin(shared_daemon: DaemonProcess) -> None:
    with writewatch.Client(shared_daemon.address) as client:
        whoami = client.whoami()
    assert (whoami.identity, whoami.role, whoami.auth_method) == (
        "unix-socket",
        pb.ROLE_ADMIN,
        pb.AUTH_METHOD_UNIX_SOCKET,
    )


def test_socket_that_requires_tokens_and_its_group(tmp_path: Path) -> None:
    group = next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    token, digest = new_token()
    config = tmp_path / "socket.toml"
    config.write_text(
        f'socket_requires_token = true\nsocket_group = "{group.gr_name}"\n'
        f'[[tokens]]\nname = "ops"\nsha256 = "{digest}"\nrole = "reader"\n'
    )
    config.chmod(0o600)
    daemon = DaemonProcess(tmp_path, {}, config=config)
    daemon.start()
    try:
        info = daemon.socket.stat()
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == group.gr_gid
        with writewatch.Client(daemon.address) as anonymous, pytest.raises(writewatch.Unauthenticated) as refused:
            anonymous.sessions()
        assert "socket_requires_token" in str(refused.value)
        with writewatch.Client(daemon.address, token=token) as ops:
            assert ops.whoami().role == pb.ROLE_READER
            with pytest.raises(writewatch.PermissionDenied):
                ops.spawn(SLEEPER)
    finally:
        daemon.stop()


def test_client_certificates_map_to_roles(tmp_path: Path, target: CoopTarget) -> None:
    pki = Pki(tmp_path / "pki")
    ca = pki.ca("ca")
    server = pki.issue("server", ca, cn="localhost", san="DNS:localhost")
    ops = pki.issue("ops", ca, cn="ops-laptop")
    dashboard = pki.issue("dashboard", ca, cn="dash", san="DNS:dash.lab")
    stranger = pki.issue("stranger", ca, cn="stranger")
    config = tmp_path / "mtls.toml"
    config.write_text(
        f'tls_cert_file = "{server.cert}"\ntls_key_file = "{server.key}"\ntls_client_ca_file = "{ca.cert}"\n'
        '[[client_certs]]\nsubject = "ops-laptop"\nrole = "controller"\n'
        '[[client_certs]]\nsubject = "dash.lab"\nrole = "reader"\nname = "dashboard"\n'
    )
    daemon = DaemonProcess(tmp_path, {}, listen="tcp:127.0.0.1:0", config=config)
    daemon.start()

    def client(pair: object) -> writewatch.Client:
        return writewatch.Client(
            f"localhost:{daemon.port}",
            tls_ca_file=ca.cert,
            tls_cert_file=pair.cert,  # type: ignore[attr-defined]
            tls_key_file=pair.key,  # type: ignore[attr-defined]
            timeout_s=20,
        )

    try:
        with client(ops) as operator, client(dashboard) as reader, client(stranger) as unknown:
            whoami = operator.whoami()
            assert (whoami.identity, whoami.role, whoami.auth_method) == (
                "ops-laptop",
                pb.ROLE_CONTROLLER,
                pb.AUTH_METHOD_CLIENT_CERTIFICATE,
            )
            session = _attach(operator, target)
            assert reader.whoami().identity == "dashboard"
            with pytest.raises(writewatch.PermissionDenied, match=r"certificate 'dashboard' \(reader\)"):
                reader.session(session.id).harvest()
            with pytest.raises(writewatch.Unauthenticated, match=r"CN=stranger.*not mapped to a role"):
                unknown.sessions()
            session.close()
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    ("settings", "mode", "wrong"),
    [
        ('[[tokens]]\nname = "a"\nsha256 = "{digest}"\nrole = "root"\n', 0o600, "tokens.0.role"),
        (
            '[[tokens]]\nname = "a"\nsha256 = "{digest}"\nrole = "reader"\n'
            '[[tokens]]\nname = "a"\nsha256 = "{other}"\nrole = "admin"\n',
            0o600,
            "tokens: the name 'a' appears twice",
        ),
        ('[[tokens]]\nname = "a"\nsha256 = "not-hex"\nrole = "reader"\n', 0o600, "tokens.0.sha256"),
        ('[[tokens]]\nname = "a"\nsha256 = "{digest}"\nrole = "reader"\n', 0o644, "readable by every user"),
    ],
)
def test_settings_errors_stop_the_daemon_at_start(tmp_path: Path, settings: str, mode: int, wrong: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(settings.format(digest=new_token()[1], other=new_token()[1]))
    config.chmod(mode)
    writewatchd = str(Path(sys.executable).parent / "writewatchd")
    listen = f"unix:{tmp_path}/d.sock"
    result = subprocess.run(
        [writewatchd, "serve", "--config", str(config), "--listen", listen, "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert wrong in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "d.sock").exists()
