"""``nats-server -js`` as a child process for the export tests: free loopback port, private store."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def nats_server_binary() -> str | None:
    """The nats-server executable (Debian puts it in /usr/sbin), or None."""
    return shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/local/sbin")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class NatsServer:
    """``nats-server -js`` on 127.0.0.1; restartable on the same port and store (kill -9 included)."""

    def __init__(self, directory: Path, *, max_payload_bytes: int | None = None) -> None:
        binary = nats_server_binary()
        assert binary is not None, "nats-server is not installed (.ci/run installs it)"
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.config = directory / "nats.conf"
        lines = [
            f"listen: 127.0.0.1:{self.port}",
            f'jetstream: {{store_dir: "{directory / "store"}", max_file_store: 16G, max_memory_store: 64M}}',
        ]
        if max_payload_bytes is not None:
            lines.append(f"max_payload: {max_payload_bytes}")
        self.config.write_text("\n".join(lines) + "\n")
        self.log = directory / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait until the port accepts connections."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server did not start: {self.log.read_text()}")

    def kill9(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        """Stop if running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
