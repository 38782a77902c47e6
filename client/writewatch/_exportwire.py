"""The export's conventions, without I/O: subjects, message ids, the stream's required
configuration, fragments fitted to a message size, and the reader's :class:`ExportAssembler`.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ._exceptions import WriteWatchError
from ._proto.writewatch.v1 import writewatch_pb2 as pb
from ._types import Delta
from ._wire import FragmentAssembler, decode_delta
from .regions import decode_regions, encode_regions, split_regions

if TYPE_CHECKING:
    from nats.js.api import StreamConfig

__all__ = [
    "CURSOR_BUCKET",
    "EVENTS_TOKEN",
    "MESSAGE_OVERHEAD_BYTES",
    "NATS_EXTRA_HINT",
    "STREAM_NAME",
    "SUBJECT_PREFIX",
    "ExportAssembler",
    "ExportError",
    "IncompatibleStream",
    "NatsUnavailable",
    "StreamLimits",
    "check_stream_config",
    "check_token",
    "default_host",
    "events_subject",
    "fit_fragments",
    "msg_id",
    "session_subject",
]

STREAM_NAME = "WRITEWATCH"
CURSOR_BUCKET = "WRITEWATCH_CURSORS"
EVENTS_TOKEN = "events"
SUBJECT_PREFIX = "writewatch"
NATS_EXTRA_HINT = "the exporter needs nats-py: pip install 'writewatch[nats]'"
# Room left in each message for the headers and the Delta's own fields besides its regions.
MESSAGE_OVERHEAD_BYTES = 512
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


class ExportError(WriteWatchError):
    """The exporter cannot go on; ``exit_code`` is the CLI's exit status."""

    exit_code = 1


class NatsUnavailable(ExportError):
    """NATS (or its JetStream) could not be reached within the retry limit."""

    exit_code = 3


class IncompatibleStream(ExportError):
    """Stream ``WRITEWATCH`` exists with settings the exporter cannot work with."""

    exit_code = 4


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Limits of the stream when the exporter creates it (an existing stream keeps its own)."""

    max_age_s: float = 7 * 86400.0
    max_bytes: int = 1 << 30
    duplicate_window_s: float = 120.0
    """How long JetStream remembers a Nats-Msg-Id: a retried publish within it is dropped."""


def default_host() -> str:
    """This machine's name as one subject token (characters other than ``[A-Za-z0-9_-]`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "localhost"


def check_token(value: str, what: str) -> str:
    if not _TOKEN.fullmatch(value):
        raise ExportError(f"{what} {value!r} cannot be a NATS subject token (use letters, digits, '_' and '-')")
    return value


def session_subject(host: str, session_id: str) -> str:
    """Subject of a session's deltas."""
    return f"{SUBJECT_PREFIX}.{host}.{session_id}"


def events_subject(host: str) -> str:
    """Subject of a host's lifecycle events."""
    return f"{SUBJECT_PREFIX}.{host}.{EVENTS_TOKEN}"


def msg_id(session_id: str, epoch: int, seq: int, fragment_index: int) -> str:
    """The Nats-Msg-Id of one fragment."""
    return f"{session_id}.{epoch}.{seq}.{fragment_index}"


def _subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` one token, ``>`` one or more trailing tokens."""
    pattern_tokens, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(pattern_tokens):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or (token not in ("*", tokens[index])):
            return False
    return len(tokens) == len(pattern_tokens)


def check_stream_config(config: StreamConfig, host: str, min_message_bytes: int) -> list[str]:
    """Why an existing stream cannot carry this host's export (empty: it can)."""
    from nats.js.api import RetentionPolicy

    problems: list[str] = []
    subjects = list(config.subjects or ())
    for subject in (session_subject(host, "s-0"), events_subject(host)):
        if not any(_subject_matches(pattern, subject) for pattern in subjects):
            problems.append(f"its subjects {subjects} do not cover {subject}")
    # nats-py leaves the policy a plain string when the server's answer has one it does not model.
    retention = str(getattr(config.retention, "value", config.retention or RetentionPolicy.LIMITS.value))
    if retention != RetentionPolicy.LIMITS.value:
        problems.append(f"retention {retention} deletes messages before every reader has them")
    if not config.duplicate_window:
        problems.append("duplicate_window is 0: retried publishes would be stored twice")
    if config.no_ack:
        problems.append("no_ack is set: publishes could not be confirmed")
    if config.sealed:
        problems.append("it is sealed")
    if config.max_msg_size is not None and 0 < config.max_msg_size < min_message_bytes:
        problems.append(f"max_msg_size {config.max_msg_size} is below {min_message_bytes} bytes")
    if config.max_msgs_per_subject not in (None, -1, 0):
        problems.append(f"max_msgs_per_subject {config.max_msgs_per_subject} drops a session's history")
    return problems


def fit_fragments(fragments: Sequence[pb.Delta], max_message_bytes: int) -> list[pb.Delta]:
    """The fragments of one delta, each small enough for a message of ``max_message_bytes``.

    The daemon's own fragments when they fit; else the delta's regions split afresh. Both are
    deterministic, so the same delta always gives the same fragments (a restarted exporter
    completes a half-published delta with exactly the missing ones).
    """
    budget_bytes = max_message_bytes - MESSAGE_OVERHEAD_BYTES
    if budget_bytes < 64:
        raise ExportError(f"messages of {max_message_bytes} bytes are too small to carry a delta")
    if all(fragment.ByteSize() <= budget_bytes for fragment in fragments):
        return list(fragments)
    parts = [decode_regions(fragment.regions) for fragment in fragments]
    regions = parts[0] if len(parts) == 1 else np.concatenate(parts)
    last = fragments[-1]
    page_size_bytes = last.regions.page_size_bytes or 4096
    chunks = split_regions(regions, budget_bytes, page_size_bytes=page_size_bytes)
    messages: list[pb.Delta] = []
    for index, chunk in enumerate(chunks):
        message = pb.Delta()
        message.CopyFrom(last)
        message.resync = any(fragment.resync for fragment in fragments)
        message.regions.CopyFrom(encode_regions(chunk, page_size_bytes=page_size_bytes))
        message.fragment_index = index
        message.n_fragments = len(chunks)
        messages.append(message)
    return messages


class ExportAssembler:
    """Reader side: exported messages in stream order → whole deltas, each ``(session, epoch, seq)`` once.

    Fragments are joined per subject; a delta left incomplete by an exporter crash is dropped
    when the next delta starts (the following deltas carry its pages again), and a delta at or
    before the last one delivered for its session (a republish after the de-duplication window)
    is skipped.
    """

    def __init__(self) -> None:
        self._assemblers: dict[str, FragmentAssembler] = {}
        self._delivered: dict[str, tuple[int, int]] = {}
        self.n_dropped_incomplete = 0
        self.n_skipped_duplicates = 0

    def add(self, subject: str, payload: bytes) -> tuple[str, Delta] | None:
        """One stream message; returns ``(host, delta)`` when it completes a new delta."""
        tokens = subject.split(".")
        if len(tokens) != 3 or tokens[0] != SUBJECT_PREFIX or tokens[2] == EVENTS_TOKEN:
            return None
        host = tokens[1]
        fragment = decode_delta(payload)
        assembler = self._assemblers.setdefault(subject, FragmentAssembler())
        pending = assembler.pending
        if pending is not None:
            same_delta = (pending.epoch, pending.seq) == (fragment.epoch, fragment.seq)
            if same_delta and fragment.fragment_index < assembler.n_received:
                return None  # a fragment stored twice
            if not same_delta or fragment.fragment_index != assembler.n_received:
                assembler.reset()
                self.n_dropped_incomplete += 1
        if fragment.fragment_index != 0 and assembler.pending is None:
            return None  # the rest of a delta whose start was dropped
        delta = assembler.add(fragment)
        if delta is None:
            return None
        delivered = self._delivered.get(subject)
        if delivered is not None and (delta.epoch, delta.seq) <= delivered:
            self.n_skipped_duplicates += 1
            return None
        self._delivered[subject] = (delta.epoch, delta.seq)
        return host, delta
