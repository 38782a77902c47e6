"""Shared fixtures: real target processes built from small C programs in tests/fixtures."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
BIN = FIXTURES / "bin"


def build_c(name: str, *extra_flags: str) -> Path:
    """Compile tests/fixtures/NAME.c once per source change; returns the binary path."""
    source = FIXTURES / f"{name}.c"
    binary = BIN / name
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        BIN.mkdir(exist_ok=True)
        tmp = binary.with_suffix(f".tmp{os.getpid()}")
        subprocess.run(["gcc", "-O2", "-g", "-Wall", "-o", str(tmp), str(source), "-lpthread", *extra_flags], check=True)
        tmp.rename(binary)
    return binary


@pytest.fixture(scope="session")
def c_program() -> Callable[[str], Path]:
    """Build a C fixture by name and return its path."""
    return build_c
