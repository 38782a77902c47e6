"""Smoke run of the benchmarks: ``bench/run.py --quick`` works end to end (no timing asserts)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SECTION_TITLES = [
    "1a. Harvest overhead in-process",
    "1b. Harvest overhead: the daemon",
    "2. Cost to the target",
    "3. Fan-out",
    "4. Latency",
    "5. Scale",
    "6. Attach",
    "7. Win32 shape",
    "8. JetStream export",
    "9. Following exec and fork",
    "10. Heat scheduling",
]


@pytest.mark.slow
def test_quick_run_prints_every_section_with_figures() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick"], check=False, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    sections = re.split(r"^## ", done.stdout, flags=re.MULTILINE)[1:]
    by_title = {title: body for body in sections for title in SECTION_TITLES if body.startswith(title)}
    assert sorted(by_title) == sorted(SECTION_TITLES), [s.splitlines()[0] for s in sections]
    for title, body in by_title.items():
        rows = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("|---")]
        # A header line plus at least one row of figures, each with a number in it.
        assert len(rows) >= 2, f"{title} printed no figures:\n{body}"
        assert all(re.search(r"\d", row) for row in rows[1:]), f"{title}:\n{body}"
