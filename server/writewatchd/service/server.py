"""Run the daemon: listener, services (WriteWatch, health, reflection), re-adoption, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from writewatch._proto.writewatch.v1 import writewatch_pb2 as pb

from .._exceptions import SessionNotFound, UsageError
from ..kernel._libc import retain_freed_memory
from ..tracking.delta import Delta
from .audit import AuditLog
from .auth import Authenticator, AuthInterceptor
from .metrics import serve_metrics
from .servicer import WriteWatchServicer, generic_handler
from .sessions import SessionManager
from .settings import Settings
from .statelock import StateDirLock
from .store import StateStore
from .wire import delta_frames

__all__ = ["Daemon", "run"]

log = logging.getLogger(__name__)

_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WriteWatch"].full_name
_MESSAGE_LIMIT_BYTES = 256 << 20


class Daemon:
    """One writewatchd instance; :meth:`start` binds and re-adopts, :meth:`stop` ends every stream.

    Construction takes the state dir's lock first (raising :class:`StateDirBusy` when another
    daemon owns it), so a refused daemon opens, binds and changes nothing.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_lock = StateDirLock(settings.state_dir)
        self.state_lock.acquire()
        self.store = StateStore(settings.state_dir / "state.db")
        self.manager = SessionManager(settings, self.store, self._encode)
        self.servicer = WriteWatchServicer(self.manager)
        # grpc-stubs does not know the asyncio health servicer.
        self.health: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.audit = AuditLog(settings.audit_log)
        interceptor = AuthInterceptor(Authenticator(settings), self.audit, self._target_of)
        self.server = grpc.aio.server(
            interceptors=[interceptor],
            options=[
                ("grpc.max_send_message_length", _MESSAGE_LIMIT_BYTES),
                ("grpc.max_receive_message_length", 16 << 20),
                ("grpc.so_reuseport", 0),
                # gRPC (>= 1.82) drops calls at random once 1000 wait to be accepted, answering
                # CANCELLED as if the caller had cancelled, and grpc.aio accepts one call per
                # event-loop turn: a burst of reconnecting subscribers failed calls nobody had
                # cancelled (docs/kernel.md 8.13). Equal limits: queue up to the bound, then refuse.
                ("grpc.server.max_pending_requests", settings.max_pending_calls),
                ("grpc.server.max_pending_requests_hard_limit", settings.max_pending_calls),
            ],
        )
        self.address = ""

    def _target_of(self, session_id: str) -> tuple[int, str] | None:
        try:
            record = self.manager.get(session_id).record
        except SessionNotFound:
            return None
        return record.pid, record.comm

    def _encode(self, session_id: str, delta: Delta) -> list[bytes]:
        return delta_frames(session_id, delta, self.settings.fragment_max_bytes)

    async def start(self) -> str:
        """Bind, serve, re-adopt the previous daemon's sessions; returns the bound address."""
        self.server.add_generic_rpc_handlers((generic_handler(self.servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        try:
            self.address = self._bind()
        except BaseException:
            self.store.close()
            self.state_lock.release()
            raise
        # Not SERVING until the previous daemon's sessions are back: a client that waits for
        # health must find them.
        await _set_health(self.health, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.settings.metrics_port:
            port = serve_metrics(self.manager, self.settings.metrics_port)
            log.info("metrics on http://127.0.0.1:%d/metrics", port)
        readoption = await self.manager.readopt()
        if readoption.adopted or readoption.exited or readoption.failed or readoption.kept:
            log.info(
                "re-adopted %d sessions; %d had exited, %d could not be re-adopted, %d left active for their holder",
                len(readoption.adopted),
                len(readoption.exited),
                len(readoption.failed),
                len(readoption.kept),
            )
        await _set_health(self.health, health_pb2.HealthCheckResponse.SERVING)
        return self.address

    def _bind(self) -> str:
        listen = self.settings.listen
        if listen.startswith("unix:"):
            path = Path(listen.removeprefix("unix:"))
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            # The socket is root-equivalent: create it with the configured mode, never wider.
            mode = self.settings.socket_mode
            old_umask = os.umask(0o777 & ~mode)
            try:
                self.server.add_insecure_port(f"unix:{path}")
            finally:
                os.umask(old_umask)
            gid = self.settings.socket_gid
            if gid is not None:
                # The operator group may connect: the socket and its directory become theirs to use.
                os.chown(path, -1, gid)
                mode |= 0o060
                if path.parent.stat().st_uid == os.geteuid():
                    os.chown(path.parent, -1, gid)
                    os.chmod(path.parent, (path.parent.stat().st_mode & 0o7777) | 0o050)
            os.chmod(path, mode)
            return f"unix:{path}"
        host_port = listen.removeprefix("tcp:")
        if not self.settings.tokens and not (self.settings.client_certs and self.settings.tls_client_ca_file):
            log.warning("listening on TCP with no tokens and no client_certs: every call over TCP will be refused")
        if self.settings.tls_cert_file and self.settings.tls_key_file:
            client_ca = self.settings.tls_client_ca_file.read_bytes() if self.settings.tls_client_ca_file else None
            credentials = grpc.ssl_server_credentials(
                [(self.settings.tls_key_file.read_bytes(), self.settings.tls_cert_file.read_bytes())],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            port = self.server.add_secure_port(host_port, credentials)
        elif self.settings.insecure_tcp:
            port = self.server.add_insecure_port(host_port)
        else:
            raise UsageError("tcp: needs tls_cert_file and tls_key_file (or insecure_tcp for tests)")
        host = host_port.rsplit(":", 1)[0]
        return f"tcp:{host}:{port}"

    async def stop(self, grace_s: float = 2.0) -> None:
        """End every stream with a final message, then stop serving."""
        await _set_health(self.health, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.servicer.stopping = True
        await self.manager.shutdown()
        # Streams got SessionEnded(DAEMON_SHUTDOWN): let them write it before the server stops.
        await self.servicer.drain(grace_s)
        await self.server.stop(grace_s)
        self.store.close()
        self.state_lock.release()
        self.audit.close()


async def _set_health(servicer: Any, status: int) -> None:
    for name in ("", _SERVICE_NAME):
        await servicer.set(name, status)


# Above the largest numpy temporaries of one fragment's encoding (a 504,405-region delta needs
# 8 MiB), small enough that retained free memory stays well inside the RSS budget.
_RETAIN_FREED_BYTES = 16 << 20


async def run(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM."""
    retain_freed_memory(_RETAIN_FREED_BYTES)
    daemon = Daemon(settings)
    address = await daemon.start()
    log.info("writewatchd listening on %s", address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await daemon.stop()
