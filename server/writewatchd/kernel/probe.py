"""What this kernel and this process can do for write tracking, found by trying it.

:func:`probe` never trusts a version number: every answer comes from a real ioctl on real
memory of the calling process (docs/kernel.md §1.2 feature probe, §5.3 fix detection, §7
soft-dirty). It takes a few milliseconds and restores everything it touched: the probe
mappings are unmapped and the probe userfaultfd is closed, which drops its registrations.
The one exception: on a kernel that has soft-dirty, checking its reset clears this
process's soft-dirty bits (``clear_refs`` has no range), which writewatchd does not use.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from .._exceptions import KernelError, ProcessGone
from .._units import round_up
from ._libc import libc
from .pagemap import PAGE_SIZE, Category, PagemapScanner
from .procevents import proc_events_available
from .uffd import TRACKING_FEATURES, UffdFeature, Userfaultfd

__all__ = ["Capabilities", "ExitedScan", "exited_scan_answer", "probe"]

#: Linux capability numbers (``linux/capability.h``).
CAP_NET_ADMIN = 12
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21

_MADV_DONTNEED = 4
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
_PMD_BYTES = 2 << 20
_PMD_PAGES = _PMD_BYTES // PAGE_SIZE
_UNPOPULATED_PROBE_PAGES = 64
_PAGEMAP_SOFT_DIRTY_BIT = 1 << 55
#: Bits above the named categories that a newer kernel may accept (e.g. a future PAGE_IS_ACCESSED).
_EXTRA_CATEGORY_BITS = range(Category.GUARD.bit_length(), 16)

_c_mmap = ctypes.CFUNCTYPE(
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
    use_errno=True,
)(("mmap", libc))
_c_munmap = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, use_errno=True)(("munmap", libc))
_c_madvise = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, use_errno=True)(
    ("madvise", libc)
)
_MAP_FAILED = ctypes.c_void_p(-1).value


class ExitedScan(StrEnum):
    """What PAGEMAP_SCAN on a pagemap fd answers once its process has exited.

    Two builds of the same kernel version differ here (docs/kernel.md §8.1), so writewatch
    never relies on either: a pidfd tells when a target exits.
    """

    PROCESS_GONE = "ESRCH"
    EMPTY = "no regions"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The result of :func:`probe`.

    ``None`` in a fix or soft-dirty field means "could not be determined"; ``notes`` says why.
    """

    kernel_release: str
    kernel_version: tuple[int, int, int]
    pagemap_scan: bool
    categories: Category
    extra_category_bits: int
    userfaultfd: bool
    uffd_features: UffdFeature
    fix_unpopulated_written: bool | None
    fix_pmd_hole_written: bool | None
    soft_dirty: bool | None
    euid: int
    cap_sys_ptrace: bool
    cap_sys_admin: bool
    unprivileged_userfaultfd: int | None
    yama_ptrace_scope: int | None
    dev_userfaultfd: bool
    exited_scan_zombie: ExitedScan | None
    exited_scan_reaped: ExitedScan | None
    cap_net_admin: bool
    process_events: bool
    notes: tuple[str, ...]
    probe_ms: float

    @property
    def wp_async(self) -> bool:
        """Whether userfaultfd offers asynchronous write-protect (Linux >= 6.7)."""
        return bool(self.uffd_features & UffdFeature.WP_ASYNC)

    @property
    def can_track(self) -> bool:
        """Whether page-exact write tracking (PAGEMAP_SCAN + WP_ASYNC) works here."""
        return self.pagemap_scan and self.wp_async and Category.WRITTEN in self.categories

    @property
    def exec_fork_detection(self) -> str:
        """How the daemon learns of a target's exec and forks: ``"events"`` or ``"polling"``."""
        return "events" if self.process_events else "polling"

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready view: flags become ``{name: bool}`` maps."""
        return {
            "kernel_release": self.kernel_release,
            "kernel_version": list(self.kernel_version),
            "can_track": self.can_track,
            "pagemap_scan": self.pagemap_scan,
            "categories": {c.name: c in self.categories for c in Category},
            "extra_category_bits": self.extra_category_bits,
            "userfaultfd": self.userfaultfd,
            "uffd_features": {f.name: f in self.uffd_features for f in UffdFeature},
            "wp_async": self.wp_async,
            "fix_unpopulated_written": self.fix_unpopulated_written,
            "fix_pmd_hole_written": self.fix_pmd_hole_written,
            "soft_dirty": self.soft_dirty,
            "euid": self.euid,
            "cap_sys_ptrace": self.cap_sys_ptrace,
            "cap_sys_admin": self.cap_sys_admin,
            "unprivileged_userfaultfd": self.unprivileged_userfaultfd,
            "yama_ptrace_scope": self.yama_ptrace_scope,
            "dev_userfaultfd": self.dev_userfaultfd,
            "exited_scan_zombie": None if self.exited_scan_zombie is None else self.exited_scan_zombie.value,
            "exited_scan_reaped": None if self.exited_scan_reaped is None else self.exited_scan_reaped.value,
            "cap_net_admin": self.cap_net_admin,
            "process_events": self.process_events,
            "exec_fork_detection": self.exec_fork_detection,
            "notes": list(self.notes),
            "probe_ms": round(self.probe_ms, 3),
        }


def probe() -> Capabilities:
    """Probe the running kernel and the calling process's permissions."""
    started_ns = time.monotonic_ns()
    notes: list[str] = []
    release = os.uname().release
    effective_caps = _effective_capabilities()

    pagemap_scan, categories, extra_bits = _probe_pagemap_scan(notes)
    userfaultfd, features = _probe_userfaultfd(notes)
    fix_unpopulated: bool | None = None
    fix_pmd_hole: bool | None = None
    if pagemap_scan and features & UffdFeature.WP_ASYNC:
        fix_unpopulated = _guarded(notes, "unpopulated-PTE fix", _probe_unpopulated_fix)
        fix_pmd_hole = _guarded(notes, "PMD-hole fix", _probe_pmd_hole_fix)
    else:
        notes.append("the 2026 PAGEMAP_SCAN fixes were not probed: PAGEMAP_SCAN or WP_ASYNC is missing")
    soft_dirty = _guarded(notes, "soft-dirty", _probe_soft_dirty)
    exited_zombie, exited_reaped = _probe_exited_scan(notes) if pagemap_scan else (None, None)
    process_events, why_not = proc_events_available()
    if not process_events:
        notes.append(f"process events unavailable ({why_not}): exec and forks are found by polling /proc")

    return Capabilities(
        kernel_release=release,
        kernel_version=_parse_version(release),
        pagemap_scan=pagemap_scan,
        categories=categories,
        extra_category_bits=extra_bits,
        userfaultfd=userfaultfd,
        uffd_features=features,
        fix_unpopulated_written=fix_unpopulated,
        fix_pmd_hole_written=fix_pmd_hole,
        soft_dirty=soft_dirty,
        euid=os.geteuid(),
        cap_sys_ptrace=bool(effective_caps >> CAP_SYS_PTRACE & 1),
        cap_sys_admin=bool(effective_caps >> CAP_SYS_ADMIN & 1),
        unprivileged_userfaultfd=_read_sysctl_int("/proc/sys/vm/unprivileged_userfaultfd"),
        yama_ptrace_scope=_read_sysctl_int("/proc/sys/kernel/yama/ptrace_scope"),
        dev_userfaultfd=os.path.exists("/dev/userfaultfd"),
        exited_scan_zombie=exited_zombie,
        exited_scan_reaped=exited_reaped,
        cap_net_admin=bool(effective_caps >> CAP_NET_ADMIN & 1),
        process_events=process_events,
        notes=tuple(notes),
        probe_ms=(time.monotonic_ns() - started_ns) / 1e6,
    )


def _parse_version(release: str) -> tuple[int, int, int]:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not match:
        return (0, 0, 0)
    return (int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))


def _effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def _read_sysctl_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _guarded(notes: list[str], what: str, check: Callable[[list[str]], bool | None]) -> bool | None:
    """Run one memory sub-probe; an unexpected kernel refusal makes the answer unknown."""
    try:
        return check(notes)
    except OSError as exc:
        notes.append(f"{what} probe failed: {exc}")
        return None


def _probe_pagemap_scan(notes: list[str]) -> tuple[bool, Category, int]:
    """Zero-length scans: ENOTTY means no PAGEMAP_SCAN; EINVAL on a mask bit means unknown bit."""
    try:
        scanner = PagemapScanner(capacity_regions=1)
    except KernelError as exc:
        notes.append(f"/proc/self/pagemap cannot be opened: {exc}")
        return False, Category(0), 0
    with scanner:
        try:
            scanner.ioctl(0, 0)
        except KernelError as exc:
            if exc.errno == errno.ENOTTY:
                notes.append("PAGEMAP_SCAN is missing (Linux >= 6.7 needed)")
            else:
                notes.append(f"PAGEMAP_SCAN refused a zero-length scan: {exc}")
            return False, Category(0), 0
        categories = Category(0)
        for category in Category:
            if _category_accepted(scanner, category.value):
                categories |= category
        extra = 0
        for bit in _EXTRA_CATEGORY_BITS:
            if _category_accepted(scanner, 1 << bit):
                extra |= 1 << bit
    return True, categories, extra


def _category_accepted(scanner: PagemapScanner, bit: int) -> bool:
    """A zero-length scan accepted the bit; any refusal (EINVAL for an unknown bit) means no."""
    try:
        scanner.ioctl(0, 0, category_mask=bit)
    except KernelError:
        return False
    return True


def _probe_userfaultfd(notes: list[str]) -> tuple[bool, UffdFeature]:
    try:
        return True, Userfaultfd.supported_features()
    except KernelError as exc:
        notes.append(f"userfaultfd is unavailable: {exc}")
        return False, UffdFeature(0)


@contextmanager
def _anonymous(length_bytes: int) -> Iterator[int]:
    """A private anonymous read-write mapping, unmapped on exit."""
    address = _c_mmap(
        None, length_bytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0
    )
    if address in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {length_bytes} probe bytes: {os.strerror(err)}")
    try:
        yield int(address)
    finally:
        _c_munmap(address, length_bytes)


def _madvise(address: int, length_bytes: int, advice: int) -> bool:
    return int(_c_madvise(address, length_bytes, advice)) == 0


def _written_pages(scanner: PagemapScanner, start: int, end: int, **masks: int) -> int:
    return scanner.scan(start, end, **masks).n_pages


def _probe_unpopulated_fix(notes: list[str]) -> bool:
    """07b4377bdbe7: after MADV_DONTNEED of protected anon pages, both scan paths read WRITTEN."""
    length_bytes = _UNPOPULATED_PROBE_PAGES * PAGE_SIZE
    with _anonymous(length_bytes) as start, Userfaultfd.create() as uffd, PagemapScanner(capacity_regions=4) as pm:
        end = start + length_bytes
        uffd.api(TRACKING_FEATURES)
        uffd.register(start, length_bytes)
        ctypes.memset(start, 1, length_bytes)
        uffd.write_protect(start, length_bytes)
        if not _madvise(start, length_bytes, _MADV_DONTNEED):
            raise OSError(ctypes.get_errno(), "MADV_DONTNEED of the probe pages")
        fast = _written_pages(pm, start, end, category_mask=Category.WRITTEN, return_mask=Category.WRITTEN)
        generic = _written_pages(pm, start, end, category_anyof_mask=Category.WRITTEN, return_mask=Category.WRITTEN)
    if fast != _UNPOPULATED_PROBE_PAGES:
        notes.append(f"fast-path scan after MADV_DONTNEED saw {fast}/{_UNPOPULATED_PROBE_PAGES} pages written")
    return fast == generic == _UNPOPULATED_PROBE_PAGES


def _probe_pmd_hole_fix(notes: list[str]) -> bool | None:
    """40de8160ca7f: a protected THP zapped whole by MADV_DONTNEED reads WRITTEN (needs a THP)."""
    with _anonymous(2 * _PMD_BYTES) as raw, PagemapScanner(capacity_regions=4) as pm:
        start = round_up(raw, _PMD_BYTES)
        end = start + _PMD_BYTES
        if not _populate_thp(pm, start):
            notes.append("PMD-hole fix unknown: no transparent huge page could be obtained")
            return None
        with Userfaultfd.create() as uffd:
            uffd.api(TRACKING_FEATURES)
            uffd.register(start, _PMD_BYTES)
            uffd.write_protect(start, _PMD_BYTES)
            if not _madvise(start, _PMD_BYTES, _MADV_DONTNEED):
                raise OSError(ctypes.get_errno(), "MADV_DONTNEED of the probe THP")
            written = _written_pages(pm, start, end, category_mask=Category.WRITTEN, return_mask=Category.WRITTEN)
    return written == _PMD_PAGES


def _populate_thp(pm: PagemapScanner, start: int) -> bool:
    """Fault (or collapse) one PMD-mapped THP at ``start``; whether that worked."""
    if not _madvise(start, _PMD_BYTES, _MADV_HUGEPAGE):
        return False
    ctypes.memset(start, 1, _PMD_BYTES)
    if _huge_pages(pm, start) == _PMD_PAGES:
        return True
    return _madvise(start, _PMD_BYTES, _MADV_COLLAPSE) and _huge_pages(pm, start) == _PMD_PAGES


def _huge_pages(pm: PagemapScanner, start: int) -> int:
    mask = Category.HUGE | Category.PRESENT
    return _written_pages(pm, start, start + _PMD_BYTES, category_mask=mask, return_mask=mask)


def _probe_soft_dirty(notes: list[str]) -> bool:
    """CONFIG_MEM_SOFT_DIRTY, tested as clear_refs 4, then a write sets pagemap bit 55.

    A new VMA reads soft-dirty at once when the kernel has the feature, so a kernel without
    it is recognised without touching clear_refs. Only when it exists is the reset itself
    tried; that clears this process's soft-dirty bits, which writewatchd does not use.
    """
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _anonymous(PAGE_SIZE) as page:
            return _soft_dirty_cycle(pagemap, page, notes)
    finally:
        os.close(pagemap)


def _soft_dirty_cycle(pagemap_fd: int, page_address: int, notes: list[str]) -> bool:
    ctypes.memset(page_address, 1, 1)
    if not _pagemap_entry(pagemap_fd, page_address) & _PAGEMAP_SOFT_DIRTY_BIT:
        notes.append("soft-dirty: a freshly written page is not soft-dirty (no CONFIG_MEM_SOFT_DIRTY)")
        return False
    Path("/proc/self/clear_refs").write_text("4")
    cleared = not _pagemap_entry(pagemap_fd, page_address) & _PAGEMAP_SOFT_DIRTY_BIT
    ctypes.memset(page_address, 2, 1)
    set_again = bool(_pagemap_entry(pagemap_fd, page_address) & _PAGEMAP_SOFT_DIRTY_BIT)
    if not cleared:
        notes.append("soft-dirty: clear_refs 4 did not clear the bit")
    return cleared and set_again


def _pagemap_entry(pagemap_fd: int, address: int) -> int:
    data = os.pread(pagemap_fd, 8, address // PAGE_SIZE * 8)
    return int.from_bytes(data, "little")


def _probe_exited_scan(notes: list[str]) -> tuple[ExitedScan | None, ExitedScan | None]:
    """Scan a child's pagemap fd once it is a zombie, then once it is reaped."""
    try:
        child = subprocess.Popen(
            ["sleep", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    except OSError as exc:
        notes.append(f"exited-process scan not probed: cannot start sleep(1): {exc}")
        return None, None
    try:
        with PagemapScanner(child.pid, capacity_regions=1) as scanner:
            child.kill()
            os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
            zombie = exited_scan_answer(scanner)
            child.wait()
            return zombie, exited_scan_answer(scanner)
    except KernelError as exc:
        notes.append(f"exited-process scan probe failed: {exc}")
        return None, None
    finally:
        child.kill()
        child.wait()


def exited_scan_answer(scanner: PagemapScanner) -> ExitedScan:
    """Which :class:`ExitedScan` a scan through ``scanner`` of an exited process gives."""
    try:
        scanner.ioctl(0, PAGE_SIZE)
    except ProcessGone:
        return ExitedScan.PROCESS_GONE
    return ExitedScan.EMPTY
