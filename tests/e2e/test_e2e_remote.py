"""A remote user's path: the CLI and the library over TCP + TLS, with CA and token from flags, env, profile.

The daemons listen on tcp:127.0.0.1 with certificates made by openssl for ``localhost``
only, so ``localhost:PORT`` is the right name and ``127.0.0.1:PORT`` a hostname mismatch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pki import Pair, Pki, needs_openssl, new_token

import writewatch
from daemonproc import DaemonProcess
from targets import NO_TICKS_MS, PAGE, CoopTarget

pytestmark = needs_openssl

WRITEWATCH = str(Path(sys.executable).parent / "writewatch")


class Remote:
    """One TLS daemon and everything a remote user of it holds."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pki = Pki(directory / "pki")
        self.ca = self.pki.ca("lab-ca")
        self.other_ca = self.pki.ca("other-ca")
        self.server = self.pki.issue("server", self.ca, cn="localhost", san="DNS:localhost")
        self.token, digest = new_token()
        self.token_file = directory / "lab.token"
        self.token_file.write_text(self.token + "\n")
        self.token_file.chmod(0o600)
        config = directory / "writewatchd.toml"
        config.write_text(
            f'tls_cert_file = "{self.server.cert}"\ntls_key_file = "{self.server.key}"\n'
            f'audit_log = "{directory / "audit.log"}"\n\n'
            f'[[tokens]]\nname = "remote-user"\nsha256 = "{digest}"\nrole = "controller"\n'
        )
        config.chmod(0o600)
        self.daemon = DaemonProcess(directory / "daemon", {}, listen="tcp:127.0.0.1:0", config=config)
        (directory / "daemon").mkdir()
        self.daemon.start()
        self.address = f"localhost:{self.daemon.port}"
        self.profile_config = directory / "client.toml"
        self.profile_config.write_text(
            f'[profiles.lab]\naddress = "{self.address}"\ntls_ca_file = "{self.ca.cert.name}"\n'
            f'token_file = "{self.token_file}"\n'
        )
        # tls_ca_file is relative: relative to the config file's directory.
        (directory / self.ca.cert.name).write_bytes(self.ca.cert.read_bytes())

    def ways(self) -> dict[str, tuple[list[str], dict[str, str]]]:
        """CLI global options and environment of each way to give address, CA and token."""
        return {
            "flags": (
                ["--address", self.address, "--tls-ca", str(self.ca.cert), "--token-file", str(self.token_file)],
                {},
            ),
            "env": (
                [],
                {
                    "WRITEWATCH_ADDRESS": self.address,
                    "WRITEWATCH_TLS_CA": str(self.ca.cert),
                    "WRITEWATCH_TOKEN": self.token,
                },
            ),
            "profile": (["--profile", "lab"], {"WRITEWATCH_CONFIG": str(self.profile_config)}),
        }


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    r = Remote(tmp_path_factory.mktemp("remote"))
    yield r
    r.daemon.stop()


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WRITEWATCH_")}
    # No client config of whoever runs the tests.
    env["WRITEWATCH_CONFIG"] = "/nonexistent/writewatch.toml"
    return env | extra


def cli(options: list[str], env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the writewatch CLI as a remote user would."""
    result = subprocess.run(
        [WRITEWATCH, *options, *args], check=False, env=_clean_env(env), capture_output=True, text=True, timeout=60
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("way", ["flags", "env", "profile"])
def test_cli_remote_session(remote: Remote, target: CoopTarget, way: str) -> None:
    options, env = remote.ways()[way]
    ping = json.loads(cli(options, env, "ping", "--json").stdout)
    assert ping["identity"] == "remote-user" and ping["role"] == "CONTROLLER" and ping["auth_method"] == "TOKEN"
    assert ping["daemon_version"] and ping["kernel_version"] == os.uname().release
    created = json.loads(
        cli(
            options,
            env,
            "attach",
            str(target.pid),
            "--uffd-fd",
            str(target.uffd_fd),
            "--range",
            f"{target.base:#x}-{target.end:#x}",
            "--tick-ms",
            str(NO_TICKS_MS),
            "--json",
        ).stdout
    )
    session_id = created["session_id"]
    sessions = json.loads(cli(options, env, "sessions", "--json").stdout)
    assert session_id in [s["session_id"] for s in sessions]

    watch = subprocess.Popen(
        [WRITEWATCH, *options, "watch", session_id, "--seconds", "2", "--json"],
        env=_clean_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with writewatch.Client(remote.address, tls_ca_file=remote.ca.cert, token=remote.token, timeout_s=20) as observer:
        deadline = time.monotonic() + 20
        while observer.session(session_id).info().statistics.n_subscribers == 0:
            assert time.monotonic() < deadline and watch.poll() is None, watch.stderr
            time.sleep(0.05)
    target.write(5, 3)
    harvested = json.loads(cli(options, env, "harvest", session_id, "--json").stdout)
    assert harvested["regions"] == [[target.base + 5 * PAGE, target.base + 8 * PAGE]]
    out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    summary = json.loads(out)
    assert summary["n_pages"] == 3 and summary["n_deltas"] == 1
    assert cli(options, env, "close", session_id).stdout.strip() == f"closed {session_id}"


@pytest.mark.parametrize("way", ["arguments", "env", "profile"])
def test_library_remote_session(remote: Remote, target: CoopTarget, way: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("WRITEWATCH_")]:
        monkeypatch.delenv(key)
    kwargs: dict[str, object] = {}
    address: str | None = None
    if way == "arguments":
        address, kwargs = remote.address, {"tls_ca_file": remote.ca.cert, "token": remote.token}
    elif way == "env":
        monkeypatch.setenv("WRITEWATCH_ADDRESS", remote.address)
        monkeypatch.setenv("WRITEWATCH_TLS_CA", str(remote.ca.cert))
        monkeypatch.setenv("WRITEWATCH_TOKEN", remote.token)
    else:
        monkeypatch.setenv("WRITEWATCH_CONFIG", str(remote.profile_config))
        kwargs = {"profile": "lab"}
    with writewatch.Client(address, timeout_s=20, **kwargs) as client:  # type: ignore[arg-type]
        assert client.whoami().identity == "remote-user"
        session = client.attach(
            target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
        )
        first = next(iter(session.subscribe()))
        assert first.resync and target.pages(first.regions) == set(range(64))
        target.write(9)
        delta = session.harvest()
        assert delta is not None and target.pages(delta.regions) == {9}
        session.close()


async def test_async_library_with_profile(remote: Remote, target: CoopTarget, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRITEWATCH_CONFIG", str(remote.profile_config))
    async with writewatch.AsyncClient(profile="lab", timeout_s=20) as client:
        session = await client.attach(
            target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
        )
        target.write(1)
        delta = await session.harvest()
        assert delta is not None and target.pages(delta.regions) == {1}
        await session.close()


def _error(options: list[str], env: dict[str, str] | None = None) -> str:
    result = cli(options, env or {}, "sessions", check=False)
    assert result.returncode == 1, result.stdout
    return result.stderr.replace("\n", " ")


def test_untrusted_certificate_names_the_ca_and_host(remote: Remote) -> None:
    message = _error(["-a", remote.address, "--tls-ca", str(remote.other_ca.cert), "--token", remote.token])
    assert "not trusted" in message and str(remote.other_ca.cert) in message and "'localhost'" in message
    assert "--tls-ca" in message


def test_hostname_mismatch_names_the_host(remote: Remote) -> None:
    message = _error(["-a", f"127.0.0.1:{remote.daemon.port}", "--tls-ca", str(remote.ca.cert)])
    assert "hostname mismatch" in message and "'127.0.0.1'" in message and str(remote.ca.cert) in message


def test_unreachable_names_the_address(remote: Remote) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    message = _error(["-a", f"localhost:{port}", "--tls-ca", str(remote.ca.cert)])
    assert f"cannot reach writewatchd at localhost:{port}" in message and "refused" in message.lower()


def test_silent_listener_reports_the_timeout(remote: Remote) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        client = writewatch.Client(f"localhost:{port}", tls_ca_file=remote.ca.cert, timeout_s=1)
        with client, pytest.raises(writewatch.RpcError) as info:
            client.sessions()
    assert f"no TLS answer from localhost:{port} within 1 s" in info.value.message


def test_wrong_token_says_where_it_came_from(remote: Remote) -> None:
    message = _error(["-a", remote.address, "--tls-ca", str(remote.ca.cert)], {"WRITEWATCH_TOKEN": "not-the-token"})
    assert "UNAUTHENTICATED" in message and "the token is not valid" in message and "WRITEWATCH_TOKEN" in message
    message = _error(["-a", remote.address, "--tls-ca", str(remote.ca.cert)])
    assert "no token was sent" in message


def test_plaintext_to_a_tls_port(remote: Remote) -> None:
    message = _error(["-a", remote.address, "--insecure", "--token", remote.token])
    assert "speaks TLS" in message and "drop --insecure" in message


def test_tls_to_a_plaintext_port(tmp_path: Path) -> None:
    token, digest = new_token()
    config = tmp_path / "plain.toml"
    config.write_text(f'insecure_tcp = true\n[[tokens]]\nname = "t"\nsha256 = "{digest}"\nrole = "reader"\n')
    config.chmod(0o600)
    daemon = DaemonProcess(tmp_path, {}, listen="tcp:127.0.0.1:0", config=config)
    daemon.start()
    try:
        message = _error(["-a", f"localhost:{daemon.port}", "--token", token])
        assert "does not speak TLS" in message and "--insecure" in message
        with writewatch.Client(f"localhost:{daemon.port}", insecure=True, token=token) as client:
            assert client.sessions() == []
    finally:
        daemon.stop()


def test_expired_client_certificate(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    ca = pki.ca("ca")
    server = pki.issue("server", ca, cn="localhost", san="DNS:localhost")
    expired: Pair = pki.issue("old-laptop", ca, cn="old-laptop", days=-1)
    valid = pki.issue("laptop", ca, cn="laptop")
    config = tmp_path / "mtls.toml"
    config.write_text(
        f'tls_cert_file = "{server.cert}"\ntls_key_file = "{server.key}"\ntls_client_ca_file = "{ca.cert}"\n'
        '[[client_certs]]\nsubject = "laptop"\nrole = "reader"\n'
        '[[client_certs]]\nsubject = "old-laptop"\nrole = "reader"\n'
    )
    daemon = DaemonProcess(tmp_path, {}, listen="tcp:127.0.0.1:0", config=config)
    daemon.start()
    try:
        address = f"localhost:{daemon.port}"
        ca_option = ["-a", address, "--tls-ca", str(ca.cert)]
        message = _error([*ca_option, "--tls-cert", str(expired.cert), "--tls-key", str(expired.key)])
        assert "has expired" in message and str(expired.cert) in message
        message = _error(ca_option)
        assert "requires a client certificate" in message
        ping = cli([*ca_option, "--tls-cert", str(valid.cert), "--tls-key", str(valid.key)], {}, "ping", "--json")
        assert json.loads(ping.stdout)["identity"] == "laptop"
    finally:
        daemon.stop()


def test_token_file_readable_by_others_is_refused(remote: Remote, tmp_path: Path) -> None:
    loose = tmp_path / "loose.token"
    loose.write_text(remote.token)
    loose.chmod(0o644)
    message = _error(["-a", remote.address, "--tls-ca", str(remote.ca.cert), "--token-file", str(loose)])
    assert f"chmod 600 {loose}" in message


def test_fleet_listing_uses_the_global_tls_and_token_options(remote: Remote, tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.txt"
    fleet.write_text(f"lab {remote.address}\n")
    options, env = remote.ways()["flags"]
    tls_and_token = options[2:]  # without --address: the fleet file gives it
    listed = json.loads(cli(tls_and_token, env, "sessions", "--fleet", str(fleet), "--json").stdout)
    assert isinstance(listed, list)
    failed = cli(["--tls-ca", str(remote.other_ca.cert)], env, "sessions", "--fleet", str(fleet), check=False)
    assert failed.returncode != 0 and "not trusted" in failed.stderr + failed.stdout
