"""Every ``python`` block of the API guide runs, as a whole program, against a real daemon."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from daemonproc import DaemonProcess

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "api.md"
EXAMPLES = re.findall(r"^```python\n(.*?)^```$", GUIDE.read_text(), re.MULTILINE | re.DOTALL)


def test_the_guide_has_examples() -> None:
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("source", EXAMPLES, ids=[f"example{i + 1}" for i in range(len(EXAMPLES))])
def test_example_runs(source: str, shared_daemon: DaemonProcess, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(source)
    result = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "WRITEWATCH_ADDRESS": shared_daemon.address},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # each example prints what it found
