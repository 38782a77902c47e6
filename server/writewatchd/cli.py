"""The ``writewatchd`` command line: one typer app; each command registers itself on :data:`app`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ._exceptions import WriteWatchError
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


def _exited_scan(caps: Capabilities) -> str:
    zombie, reaped = caps.exited_scan_zombie, caps.exited_scan_reaped
    if zombie is None or reaped is None:
        return "[yellow]unknown[/]"
    return f"zombie: {zombie.value}, reaped: {reaped.value}"


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
        (
            "scan of an exited process",
            _exited_scan(caps),
            "builds differ; writewatchd learns exits from a pidfd either way",
        ),
        (
            "process events",
            _yes_no(caps.process_events),
            "netlink proc connector: exec and fork of followed targets noticed at once",
        ),
        (
            "exec/fork detection",
            caps.exec_fork_detection,
            "without events: /proc polled once a tick (a short-lived child can be missed)",
        ),
        ("CAP_NET_ADMIN", _yes_no(caps.cap_net_admin), "process events need it before Linux 6.6"),
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


@app.command()
def serve(
    listen: Annotated[
        str | None, typer.Option(help="unix:PATH or tcp:HOST:PORT (default: a private Unix socket)")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML settings file", exists=True, dir_okay=False)] = None,
    state_dir: Annotated[Path | None, typer.Option(help="directory of the state store")] = None,
    insecure_tcp: Annotated[bool | None, typer.Option(help="allow plaintext TCP (tests only)")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR")] = "INFO",
) -> None:
    """Run the daemon until SIGINT/SIGTERM; sessions of a previous run are re-adopted."""
    import logging

    import uvloop

    from .service import Settings, run

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.load(config, listen=listen, state_dir=state_dir, insecure_tcp=insecure_tcp)
    except ValueError as exc:  # pydantic's ValidationError, or a settings file others may read or write
        typer.echo(f"writewatchd: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        uvloop.run(run(settings))
    except WriteWatchError as exc:
        typer.echo(f"writewatchd: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def demo(
    seconds: Annotated[float, typer.Option(min=1, help="how long to show the live view")] = 5.0,
) -> None:
    """Start a daemon on a temporary socket, spawn a demo writer, watch it live with the ``writewatch`` CLI."""
    import sys
    import tempfile
    import time

    console = Console()
    viewer = _writewatch_command()
    with tempfile.TemporaryDirectory(prefix="writewatch-demo-") as tmp:
        socket_path = f"{tmp}/writewatchd.sock"
        address = f"unix:{socket_path}"
        serve = ["serve", "--listen", address, "--state-dir", f"{tmp}/state", "--log-level", "WARNING"]
        daemon = subprocess.Popen([sys.executable, "-c", "from writewatchd.cli import main; main()", *serve])
        try:
            _wait_until_listening(socket_path, daemon, deadline_s=time.monotonic() + 15)
            console.print(f"[bold]writewatchd[/] pid {daemon.pid} listening on {address}")
            # The viewer runs as a user runs it: the writewatch command, talking to the daemon.
            writewatch = [*viewer, "--address", address]
            writer = [sys.executable, "-m", "writewatchd.demo_writer", "--seconds", str(seconds + 5)]
            created = _run_json([*writewatch, "spawn", "--auto", "--tick-ms", "50", "--json", "--", *writer])
            session_id = created["session_id"]
            n_tracked_pages = created["n_tracked_pages"]
            console.print(
                f"spawned the demo writer, pid {created['pid']}, tracking {n_tracked_pages:,} pages "
                f"in {len(created['ranges'])} ranges (session {session_id})"
            )
            if subprocess.run([*writewatch, "watch", session_id, "--seconds", str(seconds)], check=False).returncode:
                raise typer.Exit(1)
            listed = _run_json([*writewatch, "sessions", "--all", "--json"])
            last_seq = next(s["last_seq"] for s in listed if s["session_id"] == session_id)
            subprocess.run([*writewatch, "close", session_id], check=True, stdout=subprocess.DEVNULL)
        finally:
            daemon.terminate()
            daemon.wait(20)
    # Seq 1 is the session's first delta (a RESYNC); any later one reported writes.
    if last_seq < 2:
        console.print("[red]no write was reported[/]")
        raise typer.Exit(1)


def _writewatch_command() -> list[str]:
    """The ``writewatch`` command of this installation (beside this Python), else the one on PATH."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "writewatch"
    found = str(beside) if beside.is_file() else shutil.which("writewatch")
    if found is None:
        typer.echo("writewatchd: the demo needs the writewatch command (pip install writewatch)", err=True)
        raise typer.Exit(1)
    return [found]


def _run_json(command: list[str]) -> Any:
    done = subprocess.run(command, check=False, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise typer.Exit(1)
    return json.loads(done.stdout)


def _wait_until_listening(socket_path: str, daemon: subprocess.Popen[bytes], *, deadline_s: float) -> None:
    """Until the daemon accepts connections on its socket; exit status 1 if it dies or the deadline passes."""
    import socket
    import time

    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe_socket:
            try:
                probe_socket.connect(socket_path)
                return
            except OSError:
                pass
        if daemon.poll() is not None or time.monotonic() > deadline_s:
            typer.echo("writewatchd: the demo daemon did not start", err=True)
            raise typer.Exit(1)
        time.sleep(0.05)


def main() -> None:
    """Entry point of the ``writewatchd`` console script."""
    app()
