"""The state store keeps a session's state as the strings older daemons wrote, read back as SessionState."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from writewatchd.service.enums import SessionState
from writewatchd.service.store import SessionRecord, StateStore


def test_state_round_trips_as_the_same_strings(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.put(SessionRecord("s-active", pid=10, start_time_ticks=1, attach_mode=1, created_at_unix_ns=1))
    ended = SessionRecord("s-ended", pid=11, start_time_ticks=2, attach_mode=2, created_at_unix_ns=2)
    ended.state = SessionState.ENDED
    store.put(ended)
    assert [r.session_id for r in store.load(SessionState.ACTIVE)] == ["s-active"]
    assert [(r.session_id, r.state) for r in store.load(SessionState.ENDED)] == [("s-ended", SessionState.ENDED)]
    assert all(type(r.state) is SessionState for r in store.load())
    store.close()
    with contextlib.closing(sqlite3.connect(tmp_path / "state.db")) as db:
        rows = db.execute("SELECT id, state, json_extract(record, '$.state') FROM sessions ORDER BY id").fetchall()
    assert rows == [("s-active", "ACTIVE", "ACTIVE"), ("s-ended", "ENDED", "ENDED")]
