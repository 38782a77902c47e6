"""The capability probe and ``writewatchd doctor``, checked against direct kernel calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from writewatchd import FeatureUnavailable
from writewatchd.cli import app
from writewatchd.kernel import ALL_CATEGORIES, PAGE_SIZE, Category, PagemapScanner, UffdFeature, Userfaultfd
from writewatchd.kernel.probe import Capabilities, ExitedScan, probe
from writewatchd.kernel.procevents import proc_events_available

from .memhelpers import HPAGE_PMD_PAGES, MADV_DONTNEED, WRITTEN, MemFactory, Tracked, madvise

REQUIRED_SINCE: dict[Category, tuple[int, int]] = {
    **{c: (6, 7) for c in Category},
    Category.SOFT_DIRTY: (6, 8),
    Category.GUARD: (6, 16),
}


@pytest.fixture(scope="module")
def caps() -> Capabilities:
    return probe()


def test_this_kernel_has_everything_tracking_needs(caps: Capabilities) -> None:
    """Fails (not skips): Linux >= 6.7 as root must offer PAGEMAP_SCAN, WP_ASYNC and its categories."""
    if caps.kernel_version < (6, 7, 0) or os.geteuid() != 0:
        pytest.skip(f"Linux {caps.kernel_release} as euid {os.geteuid()}: the requirement applies to >= 6.7 as root")
    assert caps.pagemap_scan, caps.notes
    assert caps.userfaultfd, caps.notes
    assert caps.wp_async
    assert UffdFeature.WP_UNPOPULATED in caps.uffd_features
    expected = Category(sum(c for c, since in REQUIRED_SINCE.items() if caps.kernel_version[:2] >= since))
    assert caps.categories & expected == expected
    assert caps.can_track


def _accepted(bit: int) -> bool:
    with PagemapScanner(capacity_regions=1) as pm:
        try:
            pm.ioctl(0, 0, category_mask=bit)
        except FeatureUnavailable:
            return False
    return True


def test_categories_agree_with_direct_zero_length_scans(caps: Capabilities) -> None:
    if not caps.pagemap_scan:
        pytest.skip("no PAGEMAP_SCAN")
    assert {c for c in Category if _accepted(c)} == set(caps.categories)
    assert caps.extra_category_bits & int(ALL_CATEGORIES) == 0
    extra = [bool(caps.extra_category_bits >> bit & 1) for bit in range(9, 16)]
    assert [_accepted(1 << bit) for bit in range(9, 16)] == extra


def test_uffd_features_agree_with_a_handshake(caps: Capabilities) -> None:
    if not caps.userfaultfd:
        pytest.skip("no userfaultfd")
    assert caps.uffd_features == Userfaultfd.supported_features()


def test_fixes_are_detected_as_a_check_by_hand_shows(
    caps: Capabilities, make_mem: MemFactory, track: Callable[..., Tracked]
) -> None:
    """The verdict on each 2026 fix (docs/kernel.md §5.3) is what the kernel does, fixed or not."""
    if not caps.can_track:
        pytest.skip("write tracking is unavailable")
    dropped = track(make_mem("anon", 64))
    dropped.mem.write_all()
    dropped.protect()
    madvise(dropped.mem.addr, dropped.mem.length_bytes, MADV_DONTNEED)
    generic = dropped.written(category_mask=0, category_anyof_mask=WRITTEN)
    assert caps.fix_unpopulated_written == (generic == set(range(64)))
    if caps.fix_pmd_hole_written is None:
        assert any("PMD-hole" in note for note in caps.notes)
        return
    hole = track(make_mem("thp", HPAGE_PMD_PAGES))
    madvise(hole.mem.addr, hole.mem.length_bytes, MADV_DONTNEED)
    assert caps.fix_pmd_hole_written == (hole.harvest() == set(range(HPAGE_PMD_PAGES)))


def test_soft_dirty_agrees_with_pagemap_bit_55(caps: Capabilities, make_mem: MemFactory) -> None:
    """A freshly written page of a new mapping is soft-dirty exactly when the kernel has soft-dirty."""
    mem = make_mem("anon", 1)
    mem.write([0])
    with open("/proc/self/pagemap", "rb") as pagemap:
        entry = int.from_bytes(os.pread(pagemap.fileno(), 8, mem.addr // PAGE_SIZE * 8), "little")
    assert caps.soft_dirty == bool(entry >> 55 & 1)


def test_permissions(caps: Capabilities) -> None:
    status = Path("/proc/self/status").read_text().splitlines()
    cap_eff = next(int(line.split()[1], 16) for line in status if line.startswith("CapEff:"))
    assert caps.euid == os.geteuid()
    assert (caps.cap_sys_ptrace, caps.cap_sys_admin) == (bool(cap_eff >> 19 & 1), bool(cap_eff >> 21 & 1))
    assert caps.cap_net_admin == bool(cap_eff >> 12 & 1)
    sysctl = Path("/proc/sys/vm/unprivileged_userfaultfd")
    assert caps.unprivileged_userfaultfd == (int(sysctl.read_text()) if sysctl.exists() else None)
    yama = Path("/proc/sys/kernel/yama/ptrace_scope")
    assert caps.yama_ptrace_scope == (int(yama.read_text()) if yama.exists() else None)


_SIDE_EFFECTS = """
import os, sys
from writewatchd.kernel.probe import probe

def snapshot():
    with open("/proc/self/maps") as maps:
        return maps.read().splitlines(), sorted(os.listdir("/proc/self/fd"))

probe()  # warm imports and lazily created libc objects
before = snapshot()
probe()
after = snapshot()
sys.exit(0 if after == before else f"probe() changed the process: {before} -> {after}")
"""


def test_probe_is_side_effect_free() -> None:
    # In a process of its own: here, threads and garbage of earlier tests come and go
    # (a thread's exit unmaps its stack), which would show up as probe's doing.
    done = subprocess.run(
        [sys.executable, "-c", _SIDE_EFFECTS], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-4000:]


def test_to_dict_is_json_and_complete(caps: Capabilities) -> None:
    data = json.loads(json.dumps(caps.to_dict()))
    assert data["can_track"] == caps.can_track
    assert data["categories"] == {c.name: c in caps.categories for c in Category}
    assert data["uffd_features"]["WP_ASYNC"] == caps.wp_async
    assert data["kernel_version"] == list(caps.kernel_version)
    assert data["probe_ms"] >= 0


class TestDoctor:
    def test_json(self, caps: Capabilities) -> None:
        result = CliRunner().invoke(app, ["doctor", "--json"])
        data = json.loads(result.output)
        assert result.exit_code == (0 if caps.can_track else 1)
        assert data["pagemap_scan"] == caps.pagemap_scan
        assert data["categories"] == caps.to_dict()["categories"]
        for key in ("exited_scan_zombie", "exited_scan_reaped"):
            assert data[key] in {answer.value for answer in ExitedScan}
            assert data[key] == caps.to_dict()[key]

    def test_table(self, caps: Capabilities) -> None:
        result = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "200"})
        assert result.exit_code == (0 if caps.can_track else 1)
        assert "PAGEMAP_SCAN" in result.output
        assert caps.kernel_release in result.output
        assert "scan of an exited process" in result.output
        assert "process events" in result.output

    def test_process_events_and_the_polling_fallback(self, caps: Capabilities) -> None:
        data = json.loads(CliRunner().invoke(app, ["doctor", "--json"]).output)
        assert data["process_events"] == caps.process_events == proc_events_available()[0]
        assert data["exec_fork_detection"] == ("events" if caps.process_events else "polling")
        if not caps.process_events:
            assert any("polling" in note for note in caps.notes)
