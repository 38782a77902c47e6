"""The state store: sessions survive a daemon restart in SQLite (``state_dir/state.db``)."""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..tracking.heat import DEFAULT_MAX_STALENESS_MS
from .enums import SessionState

__all__ = ["SessionRecord", "StateStore"]


@dataclass(slots=True)
class SessionRecord:
    """What a restarted daemon needs to re-adopt a session."""

    session_id: str
    pid: int
    start_time_ticks: int
    attach_mode: int
    created_at_unix_ns: int
    ranges: list[tuple[int, int]] = field(default_factory=list)
    auto_ranges: bool = False
    tick_interval_ms: int = 50
    labels: dict[str, str] = field(default_factory=dict)
    uffd_fd: int | None = None
    argv: list[str] = field(default_factory=list)
    state: SessionState = SessionState.ACTIVE
    end_reason: int = 0
    end_message: str = ""
    epoch: int = 0
    comm: str = ""
    views: list[str] = field(default_factory=list)
    ended_at_unix_ns: int = 0
    """When the session ended (0 while ACTIVE)."""
    uid: int = -1
    """Effective uid of the target at attach time (-1: unknown, recorded by an older daemon)."""
    owner: str = ""
    """The identity that created the session (``token:NAME``, ``certificate:NAME``, ``unix-socket``)."""
    follow_exec: bool = False
    """Continue in a new epoch when the target executes a new program (False: end EXECED)."""
    follow_children: bool = False
    """Each child process of the target becomes a session of its own."""
    parent_session_id: str = ""
    """The session of the parent process, for a followed child."""
    root_session_id: str = ""
    """The session at the root of a followed tree ("" for the root itself)."""
    n_execs_followed: int = 0
    cmdline: list[str] = field(default_factory=list)
    """The argument vector of the program tracked now (empty when unreadable)."""
    max_staleness_ms: int = DEFAULT_MAX_STALENESS_MS
    """Heat scheduling's bound: the longest a write waits for a tick to scan it (docs/api.md)."""


class StateStore:
    """A small SQLite table of :class:`SessionRecord`; thread-safe, each write is one transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, state TEXT, record TEXT)")

    def put(self, record: SessionRecord) -> None:
        """Insert or replace one session."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO sessions (id, state, record) VALUES (?, ?, ?)",
                (record.session_id, record.state.value, json.dumps(asdict(record))),
            )

    def load(self, state: SessionState | None = None) -> list[SessionRecord]:
        """Every session (optionally only those in ``state``), oldest first."""
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT record FROM sessions").fetchall()
            else:
                rows = self._db.execute("SELECT record FROM sessions WHERE state = ?", (state.value,)).fetchall()
        records = []
        for (text,) in rows:
            data = json.loads(text)
            data["ranges"] = [tuple(pair) for pair in data["ranges"]]
            data["state"] = SessionState(data["state"])
            records.append(SessionRecord(**data))
        return sorted(records, key=lambda r: r.created_at_unix_ns)

    def delete(self, *session_ids: str) -> None:
        """Forget sessions (one transaction)."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM sessions WHERE id = ?", [(i,) for i in session_ids])
            self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
