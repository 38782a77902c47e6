"""Shared fixtures: real target processes built from small C programs in tests/fixtures, and a real daemon."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import writewatch
from daemonproc import DaemonProcess
from targets import CoopTarget, build_c


@pytest.fixture(scope="session")
def c_program() -> Callable[[str], Path]:
    """Build a C fixture by name and return its path."""
    return build_c


@pytest.fixture
def target_pages() -> int:
    """Pages of the ``target`` fixture's buffer (a module overrides this fixture for another size)."""
    return 64


@pytest.fixture
def target(target_pages: int) -> Iterator[CoopTarget]:
    """A cooperative target process with a buffer of ``target_pages``; killed after the test."""
    t = CoopTarget(target_pages)
    yield t
    t.kill()


@pytest.fixture
def daemon_env() -> dict[str, str]:
    """Extra WRITEWATCHD_* settings for the daemon of one test (override by parametrizing)."""
    return {}


@pytest.fixture
def daemon(tmp_path: Path, daemon_env: dict[str, str]) -> Iterator[DaemonProcess]:
    """A running daemon on a private Unix socket with its own state store; killed after the test."""
    d = DaemonProcess(tmp_path, daemon_env)
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[writewatch.Client]:
    """A client connected to the test's daemon."""
    with writewatch.Client(daemon.address, timeout_s=20) as c:
        yield c
