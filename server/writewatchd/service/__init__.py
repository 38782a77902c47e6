"""The gRPC daemon: sessions, harvester loops, fan-out hub, servicer, settings, state store."""

from .server import Daemon, run
from .settings import Settings

__all__ = ["Daemon", "Settings", "run"]
