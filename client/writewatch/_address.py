"""Where the daemon listens by default."""

from __future__ import annotations

import os

__all__ = ["default_address", "normalize_address"]


def default_address() -> str:
    """The daemon's default gRPC address: its Unix socket under $XDG_RUNTIME_DIR, else under /run."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return f"unix:{runtime_dir}/writewatch/writewatchd.sock"
    return "unix:/run/writewatch/writewatchd.sock"


def normalize_address(address: str) -> str:
    """A gRPC target from an address; a bare absolute path means a Unix socket."""
    return f"unix:{address}" if address.startswith("/") else address
