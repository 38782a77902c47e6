"""Target stop time of one userfaultfd injection: median and p99.

Stop time is what ``InjectionResult.stop_ns`` reports: from ``PTRACE_INTERRUPT`` until
``PTRACE_DETACH`` returned, measured by the injection helper. Targets (started with
``setsid -f``, not our children): the C fixture blocked in ``read()``, the same with a
thread busy in user mode (CPUs awake), and the Python fixture blocked in ``read()``.

Both implementations of the window are measured, interleaved round by round on the same
target (so machine noise hits both alike): the compiled one (``_window.c``) and the Python
one. ``--window`` measures one only. The load average is printed with the results.

``--hogs N`` adds N busy loops, each in its own session (so its own autogroup, like other
users' work), for the whole run: the noisy-neighbour case on purpose.

Usage (root): ``.venv/bin/python bench/attach.py [--rounds 300] [--window c|python] [--hogs N]``
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

from writewatchd.kernel.inject import Window, inject_userfaultfd

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


def measure(pid: int, rounds: int, windows: list[Window]) -> dict[str, list[int]]:
    """Stop times per window, the windows taking turns on the same target."""
    stops: dict[str, list[int]] = {window: [] for window in windows}
    for window in windows:
        inject_userfaultfd(pid, window=window).uffd.close()  # the first injection into a process is slower
    for _ in range(rounds):
        for window in windows:
            result = inject_userfaultfd(pid, window=window)
            assert result.window == window, result.window
            stops[window].append(result.stop_ns)
            result.uffd.close()
            time.sleep(0.002)
    return stops


def p99(values: list[int]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--window", choices=["c", "python"], help="measure one window only")
    parser.add_argument("--hogs", type=int, default=0, help="busy loops running meanwhile")
    args = parser.parse_args()
    windows: list[Window] = [args.window] if args.window else ["c", "python"]
    hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"], start_new_session=True) for _ in range(args.hogs)]
    try:
        run(args.rounds, windows)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def run(rounds: int, windows: list[Window]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "inject_target"
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(FIXTURES / "inject_target.c"), "-lpthread"], check=True)
        cases = {
            "C, blocked in read()": [str(binary)],
            "C + busy thread": [str(binary), "--threads=busy"],
            "Python, blocked in read()": [sys.executable, str(FIXTURES / "inject_target.py")],
        }
        print(f"load average before: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
        print(f"{'target':<28}{'window':<8}{'n':>6}{'median µs':>12}{'p99 µs':>10}{'max µs':>10}{'ratio':>8}")
        for name, argv in cases.items():
            pid, launcher = start_target(argv)
            try:
                stops = measure(pid, rounds, windows)
            finally:
                os.kill(pid, signal.SIGKILL)
                launcher.stdin.close() if launcher.stdin else None
            fastest = min(statistics.median(values) for values in stops.values())
            for window, values in stops.items():
                median = statistics.median(values)
                print(
                    f"{name:<28}{window:<8}{len(values):>6}{median / 1e3:>12.0f}"
                    f"{p99(values) / 1e3:>10.0f}{max(values) / 1e3:>10.0f}{median / fastest:>8.2f}"
                )
        print(f"load average after: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")


if __name__ == "__main__":
    main()
