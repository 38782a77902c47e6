"""``writewatchd serve`` as a child process for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class DaemonProcess:
    """``writewatchd serve`` as a child process; restartable on the same socket and state."""

    def __init__(
        self,
        directory: Path,
        env: dict[str, str],
        *,
        name: str = "d",
        state_dir: Path | None = None,
        listen: str | None = None,
        config: Path | None = None,
    ) -> None:
        self.directory = directory
        self.socket = directory / f"{name}.sock"
        self.listen = listen or f"unix:{self.socket}"
        self.address = self.listen
        self.state_dir = state_dir or directory / "state"
        self.config = config
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / ("daemon.log" if name == "d" else f"{name}.log")

    def command(self) -> list[str]:
        """The ``writewatchd serve`` command line."""
        return [
            str(Path(sys.executable).parent / "writewatchd"),
            "serve",
            "--listen",
            self.listen,
            "--state-dir",
            str(self.state_dir),
            *(["--config", str(self.config)] if self.config else []),
        ]

    def start(self) -> None:
        """Start and wait until it serves (health SERVING on a socket; its "listening" line on TCP)."""
        log_size = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"writewatchd exited: {self.log.read_text()}")
            if self.listen.startswith("tcp:"):
                found = re.search(r"writewatchd listening on tcp:(\S+)", self.log.read_text()[log_size:])
                if found:
                    self.address = found[1]
                    return
            elif self.socket.exists() and self._serving():
                return
            time.sleep(0.05)
        raise RuntimeError(f"writewatchd did not start: {self.log.read_text()}")

    @property
    def port(self) -> int:
        """The TCP port it listens on."""
        return int(self.address.rsplit(":", 1)[1])

    def _serving(self) -> bool:
        with grpc.insecure_channel(self.address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return int(self.proc.returncode)

    def n_fds(self) -> int:
        """Open file descriptors of the daemon."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))
