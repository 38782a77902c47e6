"""A daemon shared by a whole module (the per-test ``daemon`` and ``client`` are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daemonproc import DaemonProcess


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for a whole module, for tests that leave nothing behind."""
    d = DaemonProcess(tmp_path_factory.mktemp("daemon"), {})
    d.start()
    yield d
    d.stop()
