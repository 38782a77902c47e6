"""The service's own enums, equal to the ``writewatch.v1`` wire enums (pinned by a test).

The daemon takes from the client package only the wire, so it does not use the client's
copies of these.
"""

from __future__ import annotations

import enum

__all__ = ["AttachMode", "EndReason", "SessionState"]


class AttachMode(enum.IntEnum):
    """How the daemon obtains the target's userfaultfd (``writewatch.v1.AttachMode``)."""

    UNSPECIFIED = 0
    COOPERATIVE = 1
    INJECT = 2
    SPAWN = 3


class EndReason(enum.IntEnum):
    """Why a session or a subscription ended (``writewatch.v1.EndReason``)."""

    UNSPECIFIED = 0
    EXITED = 1
    DELETED = 2
    DAEMON_SHUTDOWN = 3
    EVICTED = 4
    EXECED = 5
    ERROR = 6


class SessionState(enum.StrEnum):
    """A session's lifecycle state, as the state store writes it (``writewatch.v1.SessionState``)."""

    ACTIVE = "ACTIVE"
    ENDED = "ENDED"
