"""Recording files: keep what a subscriber received, replay it later (docs/recording.md).

The file format (writer and reader) is in ``_recordfile``, the recorder in ``_recorder``;
this module is their public face.
"""

from __future__ import annotations

from ._recorder import record_session, record_session_async
from ._recordfile import (
    FORMAT_VERSION,
    MAGIC,
    Recording,
    RecordingStop,
    RecordingTruncatedWarning,
    RecordingWriter,
    read_recording,
    session_ranges,
)

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Recording",
    "RecordingStop",
    "RecordingTruncatedWarning",
    "RecordingWriter",
    "read_recording",
    "record_session",
    "record_session_async",
    "session_ranges",
]
