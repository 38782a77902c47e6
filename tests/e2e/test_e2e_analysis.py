"""End to end: `writewatch report`, `heatmap` and `rate` on real recordings of real targets."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import writewatch
from daemonproc import DaemonProcess
from recordings import WRITEWATCH, attach, run_cli, start_recorder
from targets import PAGE, CoopTarget, build_c
from writewatch.heatmap import render_heatmap

N_PAGES = 1024
HOT = (0, 128)  # pages rewritten every few milliseconds
COLD = (512, 1024)  # pages written once
# Pages 128..512 are not tracked: the heatmap must leave that hole out.


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, CoopTarget]]:
    """A 2 s recording of a target with a hot and a cold tracked range and a hole between them."""
    directory = tmp_path_factory.mktemp("workload")
    daemon = DaemonProcess(directory, {})
    daemon.start()
    target = CoopTarget(N_PAGES)
    try:
        with writewatch.Client(daemon.address) as client:
            ranges = [(target.base + a * PAGE, target.base + b * PAGE) for a, b in (HOT, COLD)]
            session = attach(client, target, ranges)
            path = directory / "workload.wwrec"
            recorder = start_recorder(daemon.address, session.id, path)
            target.write(COLD[0], COLD[1] - COLD[0])
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                target.write(HOT[0], HOT[1] - HOT[0])
                time.sleep(0.003)
            time.sleep(0.1)
            # Stopped before the target exits: an exit reports every tracked range as written
            # (their registrations vanish), which would make the cold range look written twice.
            recorder.send_signal(signal.SIGINT)
            _, stderr = recorder.communicate(timeout=30)
            assert recorder.returncode == 0, stderr
        yield path, target
    finally:
        target.kill()
        daemon.stop()


def _luminance(png: Path) -> np.ndarray:
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))[:, :, :3]
    return pixels @ np.array([0.2126, 0.7152, 0.0722])


def test_the_heatmap_shows_the_hot_range_brighter_than_the_cold(
    workload: tuple[Path, CoopTarget], tmp_path: Path
) -> None:
    path, target = workload
    png = tmp_path / "heat.png"
    info = render_heatmap(path, png)
    light = _luminance(png)
    assert light.shape == (info.image_size_px[1], info.image_size_px[0])
    left, top, right, bottom = (round(v) for v in info.axes_box_px)
    cells = light[top + 2 : bottom - 2, left + 2 : right - 2]
    assert cells.std() > 0.05  # not blank
    assert len(np.unique(np.round(cells, 2))) > 5

    def band(first_page: int, last_page: int) -> float:
        y0 = round(info.y_px(target.base + last_page * PAGE))
        y1 = round(info.y_px(target.base + first_page * PAGE))
        return float(light[y0 + 2 : y1 - 2, left + 2 : right - 2].mean())

    hot, cold = band(*HOT), band(*COLD)
    assert hot > 0.3 and hot > 3 * cold, (hot, cold)
    # Holes removed: the axis holds exactly the tracked pages.
    assert info.grid.layout.n_pages == (HOT[1] - HOT[0]) + (COLD[1] - COLD[0])
    assert info.busiest[0]["start_address"] == target.base + HOT[0] * PAGE
    # Every written page of the file is in a cell (RESYNCs excepted).
    written = sum(d.n_pages for d in writewatch.read_recording(path) if not d.resync)
    assert int(info.grid.cells.sum()) == written


def test_the_heatmap_command_and_its_zoom(workload: tuple[Path, CoopTarget], tmp_path: Path) -> None:
    path, target = workload
    png = tmp_path / "zoom.png"
    hot_range = f"0x{target.base:x}-0x{target.base + HOT[1] * PAGE:x}"
    result = run_cli("heatmap", str(path), "-o", str(png), "--range", hot_range, "--from", "0.5", "--to", "1.5")
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in result.stderr
    # A window where nothing was written says so instead of drawing nothing.
    cold_range = f"0x{target.base + COLD[0] * PAGE:x}-0x{target.base + COLD[1] * PAGE:x}"
    result = run_cli("heatmap", str(path), "-o", str(tmp_path / "none.png"), "--range", cold_range, "--from", "1")
    assert result.returncode == 1
    assert "no page was written in the selected range and time" in result.stderr
    assert not (tmp_path / "none.png").exists()


def test_report_json_matches_counts_computed_from_the_file(workload: tuple[Path, CoopTarget]) -> None:
    path, target = workload
    result = run_cli("report", str(path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    recording = writewatch.read_recording(path)
    deltas = list(recording)
    assert recording.end is not None
    written = [d for d in deltas if not d.resync]
    pages_of = [
        [a // PAGE for start, end in d.regions.tolist() for a in range(start, end, PAGE)] for d in deltas
    ]  # fmt: skip
    written_pages = [p for d, pages in zip(deltas, pages_of, strict=True) if not d.resync for p in pages]
    start_ns = min(recording.started_at_unix_ns, deltas[0].harvested_at_unix_ns)
    duration_s = (recording.end.stopped_at_unix_ns - start_ns) / 1e9
    per_second = [0] * int(duration_s)
    for d in written:
        second = int((d.harvested_at_unix_ns - start_ns) / 1e9)
        if second < len(per_second):
            per_second[second] += d.n_pages

    assert report["n_deltas"] == len(deltas) > 20
    assert report["n_resyncs"] == sum(d.resync for d in deltas)
    assert report["n_pages"] == sum(len(p) for p in pages_of)
    assert report["size_bytes"] == report["n_pages"] * PAGE
    assert report["n_written_pages"] == len(written_pages)
    assert report["working_set_pages"] == len(set(written_pages)) == (HOT[1] - HOT[0]) + (COLD[1] - COLD[0])
    assert report["n_regions"] == sum(d.n_regions for d in deltas)
    assert report["duration_s"] == pytest.approx(duration_s, abs=0.001)
    assert report["rate"]["n_intervals"] == len(per_second) >= 1
    assert report["rate"]["pages_per_second"]["min"] == min(per_second)
    assert report["rate"]["pages_per_second"]["median"] == statistics.median(per_second)
    assert report["rate"]["pages_per_second"]["max"] == max(per_second)
    hot_pages = sum(1 for p in written_pages if target.base // PAGE + HOT[0] <= p < target.base // PAGE + HOT[1])
    assert report["busiest"][0] == {
        "start_address": target.base + HOT[0] * PAGE,
        "end_address": target.base + HOT[1] * PAGE,
        "n_written_pages": hot_pages,
        "written_bytes": hot_pages * PAGE,
        "share": round(hot_pages / len(written_pages), 4),
    }
    cold_pages = sum(1 for p in written_pages if target.base // PAGE + COLD[0] <= p < target.base // PAGE + COLD[1])
    assert report["busiest"][1]["start_address"] == target.base + COLD[0] * PAGE
    assert report["busiest"][1]["n_written_pages"] == cold_pages
    # Written once each; the tracker may over-report (never under-report) a page.
    assert cold_pages >= COLD[1] - COLD[0]
    (epoch,) = report["epochs"]
    assert (epoch["first_seq"], epoch["last_seq"]) == (deltas[0].first_seq, deltas[-1].seq)
    assert report["complete"] and report["stop"] == "INTERRUPTED" and report["end_reason"] is None
    assert report["pid"] == target.pid and report["comm"] == "coop_target"

    table = run_cli("report", str(path))
    assert table.returncode == 0, table.stderr
    assert f"{report['working_set_pages']:,} distinct pages" in table.stdout


def test_an_empty_recording_is_reported_as_such(
    daemon: DaemonProcess, client: writewatch.Client, tmp_path: Path
) -> None:
    target = CoopTarget(64)
    try:
        session = attach(client, target)
        path = tmp_path / "empty.wwrec"
        recorder = start_recorder(daemon.address, session.id, path, "--duration", "0.3")
        assert recorder.wait(30) == 0
    finally:
        target.kill()
    report = json.loads(run_cli("report", str(path), "--json").stdout)
    assert report["n_deltas"] == 0 and report["working_set_pages"] == 0 and report["busiest"] == []
    assert report["rate"]["pages_per_second"]["max"] == 0
    assert report["stop"] == "DURATION"
    assert "holds no delta" in run_cli("report", str(path)).stdout
    heat = run_cli("heatmap", str(path), "-o", str(tmp_path / "empty.png"))
    assert heat.returncode == 1 and "no page was written (0 deltas" in heat.stderr
    assert "Traceback" not in heat.stderr


def test_a_multi_epoch_recording_with_resyncs(daemon: DaemonProcess, tmp_path: Path) -> None:
    target = CoopTarget(256)
    try:
        with writewatch.Client(daemon.address) as client:
            session = attach(client, target)
            path = tmp_path / "epochs.wwrec"
            recorder = start_recorder(daemon.address, session.id, path, "--from-start")
            target.write(1, 4)
            time.sleep(0.2)
        daemon.stop()
        daemon.start()
        deadline = time.monotonic() + 30
        while len({d.epoch for d in writewatch.read_recording(path)}) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        target.write(9, 2)
        time.sleep(0.2)
        target.exit()
        assert recorder.wait(30) == 0
    finally:
        target.kill()
    report = json.loads(run_cli("report", str(path), "--json").stdout)
    assert [e["n_resyncs"] for e in report["epochs"]] == [1, 1]  # --from-start: each epoch begins with one
    assert report["n_resyncs"] == 2 and report["n_resync_pages"] == 2 * 256
    assert report["working_set_pages"] == 6  # pages 1-4 and 9-10; the RESYNCs are not writes
    heat = run_cli("heatmap", str(path), "-o", str(tmp_path / "epochs.png"))
    assert heat.returncode == 0, heat.stderr


def test_bad_files_are_one_clear_line(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a recording\n")
    for command in (["report", str(text)], ["heatmap", str(text), "-o", str(tmp_path / "x.png")]):
        result = run_cli(*command)
        assert result.returncode == 1
        assert result.stderr.strip() == f"writewatch: {text} is not a writewatch recording"
    missing = run_cli("report", str(tmp_path / "missing.wwrec"))
    assert missing.returncode == 1 and "No such file" in missing.stderr


def test_heatmap_without_matplotlib_names_the_extra(workload: tuple[Path, CoopTarget], tmp_path: Path) -> None:
    path, _ = workload
    code = (
        "import sys; sys.modules['matplotlib'] = None; from writewatch.cli import main; "
        f"sys.argv = ['writewatch', 'heatmap', {str(path)!r}, '-o', {str(tmp_path / 'x.png')!r}]; main()"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "pip install 'writewatch[plot]'" in result.stderr and "Traceback" not in result.stderr


def test_rate_matches_a_steady_writer(daemon: DaemonProcess, client: writewatch.Client) -> None:
    pages_per_second = 10_000
    target = CoopTarget(8192, binary=build_c("steady_writer"))
    try:
        session = attach(client, target, tick_ms=50)
        target.command(f"go {pages_per_second}")
        time.sleep(2.5)  # a full window of steady writing
        samples = []
        for _ in range(5):
            samples.append(session.dirty_rate().pages_per_second)
            time.sleep(0.2)
        result = run_cli("--address", daemon.address, "rate", session.id, "--json")
        assert result.returncode == 0, result.stderr
        shown = json.loads(result.stdout)
        watch = subprocess.Popen(
            [WRITEWATCH, "--address", daemon.address, "rate", session.id, "--watch", "--json", "-i", "0.1"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert watch.stdout is not None
        first = watch.stdout.readline()  # it runs: now end the session under it
    finally:
        target.kill()
    watched = first + watch.communicate(timeout=30)[0]
    for rate in [*samples, shown["pages_per_second"]]:
        assert rate == pytest.approx(pages_per_second, rel=0.05), samples
    assert shown["bytes_per_second"] == pytest.approx(shown["pages_per_second"] * PAGE)
    assert shown["mib_per_second"] == pytest.approx(shown["bytes_per_second"] / (1 << 20))
    assert shown["window_ms"] == 1000 and shown["state"] == "ACTIVE"
    # --watch follows the session until it ends (the target was killed).
    lines = [json.loads(line) for line in watched.splitlines()]
    assert watch.returncode == 0 and len(lines) > 1
    assert lines[0]["state"] == "ACTIVE" and lines[-1]["state"] == "ENDED"


def test_rate_of_an_unknown_session(daemon: DaemonProcess) -> None:
    result = run_cli("--address", daemon.address, "rate", "s-nope")
    assert result.returncode == 1 and result.stderr.startswith("writewatch: NOT_FOUND")
