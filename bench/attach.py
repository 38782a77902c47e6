"""Target stop time of one userfaultfd injection: median and p99.

Stop time is what ``InjectionResult.stop_ns`` reports: from ``PTRACE_INTERRUPT`` until
``PTRACE_DETACH`` returned, measured by the injection helper. Targets (started with
``setsid -f``, not our children): the C fixture blocked in ``read()``, the same with a
thread busy in user mode (CPUs awake), and the Python fixture blocked in ``read()``.

Usage (root): ``.venv/bin/python bench/attach.py [--rounds 300]``
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from writewatchd.kernel.inject import inject_userfaultfd

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def start_target(argv: list[str]) -> tuple[int, subprocess.Popen[bytes]]:
    launcher = subprocess.Popen(["setsid", "-f", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    launcher.wait(10)
    assert launcher.stdout is not None
    pid = 0
    while (line := launcher.stdout.readline().decode().split())[0] != "ready":
        if line[0] == "pid":
            pid = int(line[1])
    return pid, launcher


def measure(pid: int, rounds: int) -> list[int]:
    inject_userfaultfd(pid).uffd.close()  # the first injection into a process is slower
    stops = []
    for _ in range(rounds):
        result = inject_userfaultfd(pid)
        stops.append(result.stop_ns)
        result.uffd.close()
        time.sleep(0.002)
    return stops


def p99(values: list[int]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "inject_target"
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(FIXTURES / "inject_target.c"), "-lpthread"], check=True)
        cases = {
            "C, blocked in read()": [str(binary)],
            "C + busy thread": [str(binary), "--threads=busy"],
            "Python, blocked in read()": [sys.executable, str(FIXTURES / "inject_target.py")],
        }
        print(f"{'target':<28}{'n':>6}{'median µs':>12}{'p99 µs':>10}{'max µs':>10}")
        for name, argv in cases.items():
            pid, launcher = start_target(argv)
            try:
                stops = measure(pid, args.rounds)
            finally:
                os.kill(pid, signal.SIGKILL)
                launcher.stdin.close() if launcher.stdin else None
            print(
                f"{name:<28}{len(stops):>6}{statistics.median(stops) / 1e3:>12.0f}"
                f"{p99(stops) / 1e3:>10.0f}{max(stops) / 1e3:>10.0f}"
            )


if __name__ == "__main__":
    main()
