"""Smoke test of bench/scan.py: the quick run completes and reports a ratio per case.

No timing is asserted; the benchmark itself checks that the harvest and the bare scan
returned the same regions and the expected number of pages in every round.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

SCAN = Path(__file__).resolve().parents[2] / "bench" / "scan.py"
CASES = {(prep, percent) for prep in ("read", "write") for percent in ("0%", "1%", "14%")}
ROW = re.compile(r"^\| (read|write) \| (\d+%) \| \d+ \| \d+ \| [^|]+ \| [^|]+ \| (\d+\.\d{3}) \|$")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCAN), "--quick", *args], check=False, capture_output=True, text=True, timeout=120
    )


def test_quick_run_prints_a_ratio_for_every_case() -> None:
    done = _run()
    assert done.returncode == 0, done.stderr
    rows = [m for m in map(ROW.match, done.stdout.splitlines()) if m]
    assert {(m[1], m[2]) for m in rows} == CASES
    assert all(float(m[3]) > 0 for m in rows)
    assert "ratio = median over rounds" in done.stdout


def test_quick_run_json() -> None:
    done = _run("--json", "--prep", "write")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    cases = report["cases"]
    assert [(c["prep"], c["percent"]) for c in cases] == [("write", 0.0), ("write", 1.0), ("write", 14.0)]
    for case in cases:
        assert case["median_ratio"] > 0
        assert len(case["baseline_ns"]) == len(case["candidate_ns"]) == report["rounds"]
    assert cases[0]["written_pages"] == 0 < cases[1]["written_pages"] < cases[2]["written_pages"]
