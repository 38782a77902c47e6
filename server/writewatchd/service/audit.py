"""The audit trail: one JSON line per control action, to a file (``audit_log``) or the daemon log.

A line says who (identity, role, how it was authenticated, peer), what (method, session,
target pid and command) and the result (a gRPC status name, with the refusal's message).
Tokens never appear: an identity is named by its settings name.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["AuditLog"]

log = logging.getLogger("writewatchd.audit")


class AuditLog:
    """Appends audit records; thread-safe, one ``write`` per line so lines never interleave."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd = -1
        self._lock = threading.Lock()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, **record: Any) -> None:
        """Record one action; keys with value None are left out."""
        fields = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        fields.update((key, value) for key, value in record.items() if value is not None)
        line = json.dumps(fields, separators=(",", ":"))
        if self._fd < 0:
            log.info("%s", line)
            return
        with self._lock:
            os.write(self._fd, (line + "\n").encode())

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
