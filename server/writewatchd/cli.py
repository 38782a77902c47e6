"""The ``writewatchd`` command line: one typer app; each command registers itself on :data:`app`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .kernel.pagemap import Category
from .kernel.probe import Capabilities, probe
from .kernel.uffd import UffdFeature

__all__ = ["app", "main"]

app = typer.Typer(
    name="writewatchd",
    help="Page-exact write tracking of Linux processes (userfaultfd WP_ASYNC + PAGEMAP_SCAN).",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """writewatchd: track which pages of a process were written, and stream them."""


def _yes_no(value: bool | None) -> str:
    if value is None:
        return "[yellow]unknown[/]"
    return "[green]yes[/]" if value else "[red]no[/]"


def _flag_names(flags: Category | UffdFeature) -> str:
    return " ".join(member.name or "" for member in type(flags) if member in flags) or "-"


def _table(caps: Capabilities) -> Table:
    table = Table(title="writewatchd doctor", show_lines=False)
    table.add_column("check")
    table.add_column("result")
    table.add_column("why it matters", style="dim")
    missing_categories = Category(sum(c.value for c in Category)) & ~caps.categories
    rows: list[tuple[str, str, str]] = [
        ("kernel", caps.kernel_release, "PAGEMAP_SCAN and WP_ASYNC need Linux >= 6.7"),
        ("write tracking usable", _yes_no(caps.can_track), "PAGEMAP_SCAN + userfaultfd WP_ASYNC"),
        ("PAGEMAP_SCAN", _yes_no(caps.pagemap_scan), "ioctl on /proc/PID/pagemap"),
        ("categories", _flag_names(caps.categories), "PAGE_IS_* bits this kernel accepts"),
        ("categories missing", _flag_names(missing_categories), "SOFT_DIRTY needs 6.8, GUARD 6.16"),
        ("userfaultfd", _yes_no(caps.userfaultfd), "needed to arm write-protection"),
        ("WP_ASYNC", _yes_no(caps.wp_async), "faults resolved in the kernel; no handler thread"),
        ("uffd features", _flag_names(caps.uffd_features), "from UFFDIO_API"),
        ("unpopulated-PTE fix", _yes_no(caps.fix_unpopulated_written), "07b4377bdbe7: DONTNEED'd pages read WRITTEN"),
        ("PMD-hole fix", _yes_no(caps.fix_pmd_hole_written), "40de8160ca7f: a zapped whole THP reads WRITTEN"),
        ("soft-dirty", _yes_no(caps.soft_dirty), "fallback tracker for kernels without WP_ASYNC"),
        ("euid", str(caps.euid), "scanning another uid's process needs root or CAP_SYS_PTRACE"),
        ("CAP_SYS_PTRACE", _yes_no(caps.cap_sys_ptrace), "pidfd_getfd and injection into other processes"),
        ("CAP_SYS_ADMIN", _yes_no(caps.cap_sys_admin), "physical frame numbers in pagemap"),
        (
            "vm.unprivileged_userfaultfd",
            "absent" if caps.unprivileged_userfaultfd is None else str(caps.unprivileged_userfaultfd),
            "0: unprivileged callers must use UFFD_USER_MODE_ONLY",
        ),
        (
            "yama ptrace_scope",
            "absent" if caps.yama_ptrace_scope is None else str(caps.yama_ptrace_scope),
            "restricts ptrace attach (injection), not scanning",
        ),
        ("/dev/userfaultfd", _yes_no(caps.dev_userfaultfd), "alternative to the syscall, by file permission"),
        ("probe time", f"{caps.probe_ms:.1f} ms", ""),
    ]
    for row in rows:
        table.add_row(*row)
    return table


@app.command()
def doctor(
    json_output: Annotated[bool, typer.Option("--json", help="Print the capabilities as JSON.")] = False,
) -> None:
    """Probe this kernel and process for what write tracking needs; exit 1 when tracking cannot work."""
    caps = probe()
    if json_output:
        typer.echo(json.dumps(caps.to_dict(), indent=2))
    else:
        console = Console()
        console.print(_table(caps))
        for note in caps.notes:
            console.print(f"note: {note}", markup=False)
    if not caps.can_track:
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the ``writewatchd`` console script."""
    app()
