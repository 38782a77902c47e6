"""The daemon in-process: TCP with and without TLS, metrics."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest

import writewatch
from targets import NO_TICKS_MS, CoopTarget
from writewatchd import UsageError
from writewatchd.service import Daemon, Settings
from writewatchd.service.metrics import session_registry
from writewatchd.service.settings import TokenSettings

TOKEN = "test-token"
TOKENS = [TokenSettings(name="test", sha256=hashlib.sha256(TOKEN.encode()).hexdigest(), role="controller")]


@pytest.fixture
async def tcp_daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    daemon = Daemon(Settings(listen="tcp:127.0.0.1:0", insecure_tcp=True, state_dir=tmp_path, tokens=TOKENS))
    await daemon.start()
    yield daemon
    await daemon.stop(grace_s=0)


async def test_plaintext_tcp_must_be_forced(tmp_path: Path) -> None:
    daemon = Daemon(Settings(listen="tcp:127.0.0.1:0", state_dir=tmp_path))
    with pytest.raises(UsageError, match="tls_cert_file"):
        await daemon.start()


async def test_tcp_session_and_metrics(tcp_daemon: Daemon) -> None:
    target = CoopTarget(32)
    try:
        address = tcp_daemon.address.removeprefix("tcp:")
        async with writewatch.AsyncClient(address, insecure=True, token=TOKEN) as client:
            session = await client.attach(
                target.pid, ranges=[(target.base, target.end)], uffd_fd=target.uffd_fd, tick_interval_ms=NO_TICKS_MS
            )
            target.write(2)
            delta = await session.harvest()
            assert delta is not None and target.pages(delta.regions) == {2}
        text = generate_latest(session_registry(tcp_daemon.manager)).decode()
        assert "writewatchd_sessions 1.0" in text
        assert f'writewatchd_pages_total{{session="{session.id}"}} 33.0' in text  # 32 at attach + 1
    finally:
        target.kill()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
async def test_tls_tcp(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1"]
    subject = ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"]
    subprocess.run(["openssl", *request, *subject], check=True, capture_output=True)
    settings = Settings(
        listen="tcp:localhost:0", tls_cert_file=cert, tls_key_file=key, state_dir=tmp_path, tokens=TOKENS
    )
    daemon = Daemon(settings)
    await daemon.start()
    try:
        port = daemon.address.rsplit(":", 1)[1]
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with writewatch.AsyncClient(f"localhost:{port}", credentials=credentials, token=TOKEN) as client:
            assert await client.sessions() == []
        async with writewatch.AsyncClient(f"localhost:{port}", timeout_s=2, insecure=True, token=TOKEN) as plain:
            with pytest.raises(writewatch.RpcError):
                await plain.sessions()
    finally:
        await daemon.stop(grace_s=0)
