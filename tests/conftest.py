"""Shared fixtures: real target processes built from small C programs in tests/fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from targets import build_c


@pytest.fixture(scope="session")
def c_program() -> Callable[[str], Path]:
    """Build a C fixture by name and return its path."""
    return build_c
