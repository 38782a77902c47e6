"""The ``writewatch`` command line: sessions, attach, spawn, watch, harvest, flush, scan, views, write-watch, close.

Longer than 450 lines on purpose: it is the one typer app, and each command is mostly the
declaration of its options around a few calls; text parsing and formatting are in
``_clitext``, the work in the client, ``_watch``, ``_recorder`` and ``export``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ._client import Client, Session, View
from ._clitext import message_to_json, parse_mask, parse_number, parse_pairs, parse_range, short_name
from ._connect import Connection, resolve
from ._exceptions import WriteWatchError
from ._proto.writewatch.v1 import writewatch_pb2 as pb
from ._types import PageCategory
from ._watch import format_bytes, watch_session, watch_session_async
from ._wire import RangesArg
from .analysis import recording_report
from .fleet import Fleet, FleetError
from .heatmap import render_heatmap
from .recording import record_session
from .regions import DEFAULT_PAGE_SIZE_BYTES

__all__ = [
    "app",
    "format_bytes",
    "main",
    "message_to_json",
    "parse_mask",
    "parse_number",
    "parse_range",
    "watch_session",
    "watch_session_async",
]

app = typer.Typer(
    name="writewatch",
    help="Stream and query the pages a process writes, from writewatchd.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_console = Console()
_errors_console = Console(stderr=True, highlight=False)


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


@contextmanager
def _errors() -> Iterator[None]:
    """Turn client errors into one line on stderr and exit status 1."""
    try:
        yield
    except (WriteWatchError, ValueError, OSError) as error:
        _errors_console.print(f"writewatch: {error}", markup=False, soft_wrap=True)
        raise typer.Exit(1) from None


AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        "-a",
        help="Daemon address (unix:/path, /path, host:port). [default: $WRITEWATCH_ADDRESS, else the daemon's socket]",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
SessionArgument = Annotated[str, typer.Argument(help="Session id.", show_default=False)]
RangeOption = Annotated[
    list[str] | None,
    typer.Option("--range", "-r", help="Range to track, START-END or START+SIZE (repeatable).", show_default=False),
]
AutoOption = Annotated[bool, typer.Option("--auto", help="Track every writable private mapping (the default).")]
TickOption = Annotated[int, typer.Option("--tick-ms", min=0, help="Harvest period in ms (0: daemon default).")]
LabelOption = Annotated[
    list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE label (repeatable).", show_default=False)
]
FollowExecOption = Annotated[
    bool,
    typer.Option(
        "--follow-exec/--no-follow-exec",
        help="Continue through execve in a new epoch (auto ranges); --no-follow-exec ends the session EXECED.",
    ),
]
StalenessOption = Annotated[
    int | None,
    typer.Option(
        "--max-staleness-ms",
        min=0,
        help="Longest a write may wait for a tick to scan its range (default: the daemon's, 1000; 0: every tick).",
    ),
]
FollowChildrenOption = Annotated[
    bool,
    typer.Option("--follow-children", help="Track every child process in a session of its own (and theirs)."),
]


@app.callback()
def _root(
    ctx: typer.Context,
    *,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            "-a",
            help="Daemon address (unix:/path, /path, host:port). [env: WRITEWATCH_ADDRESS; default: the socket]",
            show_default=False,
        ),
    ] = None,
    tls_ca: Annotated[
        str | None,
        typer.Option("--tls-ca", help="CA file that signed the daemon's certificate. [env: WRITEWATCH_TLS_CA]"),
    ] = None,
    tls_cert: Annotated[
        str | None, typer.Option("--tls-cert", help="Client certificate (PEM). [env: WRITEWATCH_TLS_CERT]")
    ] = None,
    tls_key: Annotated[
        str | None, typer.Option("--tls-key", help="Key of the client certificate. [env: WRITEWATCH_TLS_KEY]")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", help="Bearer token (visible in ps; prefer --token-file). [env: WRITEWATCH_TOKEN]"),
    ] = None,
    token_file: Annotated[
        str | None, typer.Option("--token-file", help="File holding the token (mode 600, not readable by others).")
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option("--profile", "-p", help="Profile of ~/.config/writewatch/config.toml. [env: WRITEWATCH_PROFILE]"),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plaintext TCP (only for a daemon run with insecure_tcp).")
    ] = False,
) -> None:
    """writewatch: see which pages of a process are written, live.

    A host:port address uses TLS; options left out come from --profile, then WRITEWATCH_* variables.
    """
    ctx.obj = {
        "address": address,
        "token": token,
        "token_file": token_file,
        "tls_ca_file": tls_ca,
        "tls_cert_file": tls_cert,
        "tls_key_file": tls_key,
        "profile": profile,
        "insecure": insecure or None,
    }


def _connection(ctx: typer.Context, address: str | None) -> Connection:
    """The connection of the global options, a command's own --address winning."""
    options: dict[str, Any] = dict(ctx.obj or {})
    if address:
        options["address"] = address
    return resolve(options.pop("address"), **options)


def _client(ctx: typer.Context, address: str | None) -> Client:
    return Client(_connection(ctx, address))


def _ranges(ranges: list[str] | None, auto: bool) -> RangesArg:
    if ranges and auto:
        raise typer.BadParameter("give --range or --auto, not both")
    return [parse_range(text) for text in ranges] if ranges else "auto"


def _page_size_bytes(client: Client) -> int:
    """The daemon's page size (from its capabilities), for what is shown in pages."""
    return client.capabilities().page_size_bytes or DEFAULT_PAGE_SIZE_BYTES


def _session_row(snapshot: pb.Session, page_size_bytes: int) -> list[str]:
    tracked = "auto" if snapshot.auto_ranges else f"{len(snapshot.ranges)} ranges"
    return [
        snapshot.session_id,
        str(snapshot.pid),
        snapshot.comm,
        short_name(pb.AttachMode, snapshot.attach_mode),
        short_name(pb.SessionState, snapshot.state)
        + (f" ({short_name(pb.EndReason, snapshot.end_reason)})" if snapshot.end_reason else ""),
        f"{tracked}, {format_bytes(snapshot.n_tracked_pages * page_size_bytes)}",
        str(snapshot.last_seq),
        str(snapshot.statistics.n_subscribers),
        " ".join(f"{k}={v}" for k, v in sorted(snapshot.labels.items())),
    ]


def _print_sessions(sessions: Sequence[Session], as_json: bool, hosts: Sequence[str] | None = None) -> None:
    """The sessions table (or JSON); with ``hosts`` (one per session) a host column first."""
    snapshots = [s.snapshot for s in sessions]
    if as_json:
        rows = [message_to_json(s) for s in snapshots]
        if hosts is not None:
            rows = [{"host": host, **row} for host, row in zip(hosts, rows, strict=True)]
        _print_json(rows)
        return
    table = Table()
    if hosts is not None:
        table.add_column("host", no_wrap=True)
    # The id is what every other command takes: never truncate it.
    table.add_column("session", no_wrap=True, min_width=max((len(s.session_id) for s in snapshots), default=7))
    for header in ("pid", "command", "mode", "state", "tracked", "seq", "subs", "labels"):
        table.add_column(header)
    page_sizes = {id(s.client): _page_size_bytes(s.client) for s in sessions}  # one call per daemon
    for index, session in enumerate(sessions):
        row = _session_row(session.snapshot, page_sizes[id(session.client)])
        table.add_row(*([hosts[index]] if hosts is not None else []), *row)
    _console.print(table)


def _print_created(session: Session, as_json: bool) -> None:
    if as_json:
        _print_json(message_to_json(session.snapshot))
        return
    snapshot = session.snapshot
    mode = short_name(pb.AttachMode, snapshot.attach_mode)
    typer.echo(f"{session.id}\tpid {snapshot.pid} ({mode}), {len(snapshot.ranges)} ranges")


def _tree_order(snapshots: Sequence[pb.Session]) -> list[tuple[int, pb.Session]]:
    """Sessions depth-first under their parents, each with its depth (orphans at the top level)."""
    ids = {s.session_id for s in snapshots}
    children: dict[str, list[pb.Session]] = {}
    for snapshot in snapshots:
        parent = snapshot.parent_session_id if snapshot.parent_session_id in ids else ""
        children.setdefault(parent, []).append(snapshot)
    ordered: list[tuple[int, pb.Session]] = []

    def visit(parent: str, depth: int) -> None:
        for snapshot in children.get(parent, []):
            ordered.append((depth, snapshot))
            visit(snapshot.session_id, depth + 1)

    visit("", 0)
    return ordered


def _print_tree(sessions: Sequence[Session], as_json: bool) -> None:
    """Followed process trees of one daemon: each child session under its parent's."""
    ordered = _tree_order([s.snapshot for s in sessions])
    if as_json:
        _print_json([{"depth": depth, **message_to_json(s)} for depth, s in ordered])
        return
    table = Table()
    table.add_column("session", no_wrap=True)
    for header in ("pid", "command", "execs", "state", "tracked", "seq", "labels"):
        table.add_column(header)
    page_size_bytes = _page_size_bytes(sessions[0].client) if sessions else DEFAULT_PAGE_SIZE_BYTES
    for depth, snapshot in ordered:
        row = _session_row(snapshot, page_size_bytes)
        # _session_row: session, pid, command, mode, state, tracked, seq, subs, labels
        table.add_row(
            "  " * depth + ("└ " if depth else "") + row[0],
            row[1],
            row[2],
            str(snapshot.n_execs_followed),
            row[4],
            row[5],
            row[6],
            row[8],
        )
    _console.print(table)


@app.command()
def sessions(
    ctx: typer.Context,
    *,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also list ended sessions (kept for the daemon's retention).")
    ] = False,
    tree: Annotated[
        bool, typer.Option("--tree", help="Show followed process trees: child sessions under their parents.")
    ] = False,
    address: AddressOption = None,
    fleet_file: Annotated[
        Path | None,
        typer.Option(
            "--fleet",
            help="Sessions of every daemon listed in FILE (one per line: ADDRESS or NAME ADDRESS).",
            exists=True,
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List the daemon's active sessions (--all: also the ended ones it keeps; --fleet: of many daemons)."""
    if fleet_file is None:
        with _errors(), _client(ctx, address) as client:
            found = client.sessions(include_ended=show_all)
            if tree:
                _print_tree(found, as_json)
            else:
                _print_sessions(found, as_json)
        return
    # The global TLS and token options apply to every daemon of the fleet; the file gives the addresses.
    options = {key: value for key, value in (ctx.obj or {}).items() if key != "address"}
    with _errors(), Fleet.from_file(fleet_file, **options) as fleet:
        try:
            listed = fleet.sessions(include_ended=show_all)
        except FleetError as error:
            listed = error.sessions
            _print_sessions([s for _, s in listed], as_json, [host for host, _ in listed])
            for host, host_error in error.errors.items():
                _errors_console.print(f"writewatch: {host}: {host_error}", markup=False, soft_wrap=True)
            raise typer.Exit(1) from None
        _print_sessions([s for _, s in listed], as_json, [host for host, _ in listed])


@app.command()
def attach(
    ctx: typer.Context,
    *,
    pid: Annotated[int, typer.Argument(help="Process to track.", show_default=False)],
    ranges: RangeOption = None,
    auto: AutoOption = False,
    uffd_fd: Annotated[
        int | None,
        typer.Option("--uffd-fd", help="The target's own userfaultfd (cooperative mode); else inject.", min=0),
    ] = None,
    tick_ms: TickOption = 0,
    labels: LabelOption = None,
    follow_exec: FollowExecOption = True,
    follow_children: FollowChildrenOption = False,
    max_staleness_ms: StalenessOption = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start tracking a running process; prints the session id."""
    with _errors(), _client(ctx, address) as client:
        session = client.attach(
            pid,
            _ranges(ranges, auto),
            uffd_fd=uffd_fd,
            tick_interval_ms=tick_ms,
            labels=parse_pairs(labels, "label"),
            follow_exec=follow_exec,
            follow_children=follow_children,
            max_staleness_ms=max_staleness_ms,
        )
        _print_created(session, as_json)


@app.command(context_settings={"allow_interspersed_args": False})
def spawn(
    ctx: typer.Context,
    *,
    command: Annotated[list[str], typer.Argument(help="Program and arguments (after --).", show_default=False)],
    ranges: RangeOption = None,
    auto: AutoOption = False,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE environment (repeatable).", show_default=False)
    ] = None,
    cwd: Annotated[str | None, typer.Option("--cwd", help="Working directory of the program.")] = None,
    tick_ms: TickOption = 0,
    labels: LabelOption = None,
    follow_exec: FollowExecOption = True,
    follow_children: FollowChildrenOption = False,
    max_staleness_ms: StalenessOption = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a program under tracking from its first instruction; prints the session id.

    For launchers (``sh -c 'exec …'``, ``env``, ``proton run game.exe``) use
    ``--follow-children``: every program of the chain is tracked, each child process in a
    session of its own (``writewatch sessions --tree``).
    """
    with _errors(), _client(ctx, address) as client:
        session = client.spawn(
            command,
            _ranges(ranges, auto),
            env=parse_pairs(env, "environment variable") or None,
            cwd=cwd,
            tick_interval_ms=tick_ms,
            labels=parse_pairs(labels, "label"),
            follow_exec=follow_exec,
            follow_children=follow_children,
            max_staleness_ms=max_staleness_ms,
        )
        _print_created(session, as_json)


@app.command()
def watch(
    ctx: typer.Context,
    session_id: SessionArgument,
    seconds: Annotated[
        float | None, typer.Option("--seconds", "-s", min=0, help="Stop after this long (default: until it ends).")
    ] = None,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Live view of a session's writes: rates and busiest ranges, then a summary."""
    with _errors(), _client(ctx, address) as client:
        summary = watch_session(client, session_id, seconds, console=_console, live=not as_json)
    if as_json:
        _print_json(summary)
        return
    table = Table("summary", "", box=None, show_header=False)
    for key in ("elapsed_s", "n_deltas", "n_resyncs", "n_regions", "n_pages", "epoch", "last_seq", "end_reason"):
        table.add_row(key, str(summary[key]))
    table.add_row("size", format_bytes(summary["size_bytes"]))
    table.add_row("pages/s", f"{summary['pages_per_second']:,.1f}")
    table.add_row("bytes/s", format_bytes(summary["bytes_per_second"]) + "/s")
    _console.print(table)


@app.command()
def record(
    ctx: typer.Context,
    *,
    session_id: SessionArgument,
    output: Annotated[Path, typer.Option("--output", "-o", help="Recording file to write.", show_default=False)],
    duration: Annotated[
        float | None, typer.Option("--duration", "-d", min=0, help="Stop after this many seconds [default: at the end]")
    ] = None,
    from_start: Annotated[
        bool, typer.Option("--from-start", help="Start at the beginning of the current epoch, not at the next delta.")
    ] = False,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Record a session's deltas into a file until it ends, --duration passes or Ctrl-C.

    The file (docs/recording.md) is read by `report`, `heatmap` and writewatch.read_recording();
    it stays readable whenever the recorder stops, even when killed.
    """
    with _errors(), _client(ctx, address) as client:
        summary = record_session(
            client,
            session_id,
            output,
            duration,
            from_start=from_start,
            console=_errors_console if _errors_console.is_terminal else None,
            handle_signals=True,
        )
    if as_json:
        _print_json(summary)
        return
    ended = f", session {summary['end_reason']}" if summary["end_reason"] else ""
    _errors_console.print(
        f"recorded {summary['n_deltas']:,} deltas, {summary['n_pages']:,} pages "
        f"({format_bytes(summary['size_bytes'])}) in {summary['elapsed_s']:.1f} s to {summary['path']} "
        f"({format_bytes(summary['file_bytes'])}; stopped: {summary['stop']}{ended})",
        soft_wrap=True,
    )


def _dirty_rate_table(rate: pb.DirtyRate, state: str) -> Table:
    table = Table(
        "", f"over {rate.window_ms / 1000:g} s", box=None, padding=(0, 2), title=f"{rate.session_id}  {state}"
    )
    table.add_row("pages/s", f"{rate.pages_per_second:,.1f}")
    table.add_row("bytes/s", format_bytes(rate.bytes_per_second) + "/s")
    table.add_row("regions/s", f"{rate.regions_per_second:,.1f}")
    return table


def _dirty_rate_json(rate: pb.DirtyRate, state: str) -> dict[str, Any]:
    return message_to_json(rate) | {"mib_per_second": rate.bytes_per_second / (1 << 20), "state": state}


@app.command()
def rate(
    ctx: typer.Context,
    *,
    session_id: SessionArgument,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C or the session ends.")] = False,
    interval: Annotated[float, typer.Option("--interval", "-i", min=0.05, help="Seconds between refreshes.")] = 1.0,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """The session's exact dirty rate (GetDirtyRate): pages/s, bytes/s, regions/s over the daemon's window.

    With --json and --watch, one JSON object per line.
    """
    with _errors(), _client(ctx, address) as client:
        session = client.session(session_id)
        if not watch:
            snapshot = session.info()
            sample = session.dirty_rate()
            state = short_name(pb.SessionState, snapshot.state)
            if as_json:
                _print_json(_dirty_rate_json(sample, state))
            else:
                _console.print(_dirty_rate_table(sample, state))
            return
        display = None if as_json else Live(console=_console, auto_refresh=False)
        with display or nullcontext(), suppress(KeyboardInterrupt):
            while True:
                sample = session.dirty_rate()
                snapshot = session.info()
                state = short_name(pb.SessionState, snapshot.state)
                if display is None:
                    typer.echo(json.dumps(_dirty_rate_json(sample, state)))
                else:
                    display.update(_dirty_rate_table(sample, state), refresh=True)
                if snapshot.state == pb.SESSION_STATE_ENDED:
                    return
                time.sleep(interval)


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="Recording file.", show_default=False)],
    interval: Annotated[
        float, typer.Option("--interval", "-i", min=0.001, help="Seconds per dirty-rate sample.")
    ] = 1.0,
    as_json: JsonOption = False,
) -> None:
    """Summarise a recording: duration, deltas, pages, dirty rate over time, working set, busiest ranges, epochs."""
    with _errors():
        summary = recording_report(path, interval_s=interval)
    if as_json:
        _print_json(summary)
        return
    _print_report(summary)


def _print_report(summary: dict[str, Any]) -> None:
    page = summary["page_size_bytes"]
    if summary["complete"]:
        state = f"complete (stopped: {summary['stop']}" + (
            f", session {summary['end_reason']})" if summary["end_reason"] else ")"
        )
    elif summary["truncated"]:
        state = "TRUNCATED: the file ends inside a record; the whole records before it were read"
    else:
        state = "not closed by the recorder (killed?); every record is whole"
    overview = Table(box=None, show_header=False, padding=(0, 2), title=f"recording {summary['path']}")
    overview.add_row("session", f"{summary['session_id']}  pid {summary['pid']}  {summary['comm']}")
    overview.add_row("file", state)
    overview.add_row("duration", f"{summary['duration_s']:.3f} s")
    overview.add_row("deltas", f"{summary['n_deltas']:,} ({summary['n_resyncs']:,} RESYNC)")
    overview.add_row("pages received", f"{summary['n_pages']:,} ({format_bytes(summary['size_bytes'])}), "
                     f"{summary['n_resync_pages']:,} of them in RESYNCs")  # fmt: skip
    overview.add_row("pages written", f"{summary['n_written_pages']:,} ({format_bytes(summary['written_bytes'])})")
    overview.add_row(
        "working set",
        f"{summary['working_set_pages']:,} distinct pages ({format_bytes(summary['working_set_bytes'])}) "
        f"of {summary['tracked_pages']:,} tracked",
    )
    rate_stats = summary["rate"]["pages_per_second"]
    overview.add_row(
        f"dirty rate per {summary['rate']['interval_s']:g} s",
        "  ".join(f"{name} {rate_stats[name]:,.0f} pages/s ({format_bytes(rate_stats[name] * page)}/s)"
                  for name in ("min", "median", "max")),
    )  # fmt: skip
    _console.print(overview)
    if summary["n_deltas"] == 0:
        _console.print("the recording holds no delta: nothing was written while it ran")
    if summary["busiest"]:
        busiest = Table("busiest range", "pages written", "share", box=None, padding=(0, 2))
        for row in summary["busiest"]:
            busiest.add_row(
                f"0x{row['start_address']:x}-0x{row['end_address']:x}",
                f"{row['n_written_pages']:,}",
                f"{row['share']:.1%}",
            )
        _console.print(busiest)
    if summary["epochs"]:
        epochs = Table("epoch", "seqs", "deltas", "RESYNCs", "pages", box=None, padding=(0, 2))
        for epoch in summary["epochs"]:
            epochs.add_row(
                str(epoch["epoch"]),
                f"{epoch['first_seq']}..{epoch['last_seq']}",
                f"{epoch['n_deltas']:,}",
                str(epoch["n_resyncs"]),
                f"{epoch['n_pages']:,}",
            )
        _console.print(epochs)


@app.command()
def heatmap(
    *,
    path: Annotated[Path, typer.Argument(help="Recording file.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.", show_default=False)],
    address_range: Annotated[
        str | None, typer.Option("--range", "-r", help="Only START-END (or START+SIZE) addresses.", show_default=False)
    ] = None,
    from_s: Annotated[
        float | None, typer.Option("--from", min=0, help="Start at this second.", show_default=False)
    ] = None,
    to_s: Annotated[float | None, typer.Option("--to", min=0, help="End at this second.", show_default=False)] = None,
) -> None:
    """Draw a recording: address x time, colour = pages written per cell (log), tracked ranges laid end to end.

    Needs matplotlib (pip install 'writewatch[plot]').
    """
    with _errors():
        try:
            info = render_heatmap(
                path,
                output,
                address_range=parse_range(address_range) if address_range else None,
                from_s=from_s,
                to_s=to_s,
            )
        except ImportError as error:
            raise ValueError(str(error)) from None
    rows, cols = info.grid.cells.shape
    _errors_console.print(
        f"wrote {output}: {cols} x {rows} cells, {int(info.grid.cells.sum()):,} pages written", soft_wrap=True
    )


@app.command()
def harvest(
    ctx: typer.Context, session_id: SessionArgument, address: AddressOption = None, as_json: JsonOption = False
) -> None:
    """Harvest now and print the written regions."""
    with _errors(), _client(ctx, address) as client:
        delta = client.session(session_id).harvest()
    if as_json:
        _print_json(
            None
            if delta is None
            else {
                "epoch": delta.epoch,
                "seq": delta.seq,
                "resync": delta.resync,
                "n_pages": delta.n_pages,
                "regions": delta.regions.tolist(),
            }
        )
        return
    if delta is None:
        typer.echo("nothing written")
        return
    typer.echo(f"epoch {delta.epoch} seq {delta.seq}: {delta.n_regions} regions, {delta.n_pages} pages")
    for start, end in delta.regions.tolist():
        typer.echo(f"0x{start:x}-0x{end:x}")


@app.command()
def flush(
    ctx: typer.Context, session_id: SessionArgument, address: AddressOption = None, as_json: JsonOption = False
) -> None:
    """Barrier: print (epoch, seq) such that every write made before is in a delta up to that seq."""
    with _errors(), _client(ctx, address) as client:
        epoch, seq = client.session(session_id).flush()
    if as_json:
        _print_json({"epoch": epoch, "seq": seq})
        return
    typer.echo(f"epoch {epoch} seq {seq}")


@app.command()
def scan(
    ctx: typer.Context,
    *,
    session_id: SessionArgument,
    start: Annotated[int, typer.Argument(parser=parse_number, help="Start address.", show_default=False)],
    end: Annotated[int, typer.Argument(parser=parse_number, help="End address (exclusive).", show_default=False)],
    mask: Annotated[int, typer.Option("--mask", parser=parse_mask, help="Categories that must all be set.")] = 0,
    anyof: Annotated[int, typer.Option("--anyof", parser=parse_mask, help="Categories of which one must be set.")] = 0,
    inverted: Annotated[int, typer.Option("--inverted", parser=parse_mask, help="Categories negated first.")] = 0,
    return_mask: Annotated[
        int | None,
        typer.Option("--return-mask", parser=parse_mask, help="Categories reported [default: mask|anyof]."),
    ] = None,
    max_pages: Annotated[int, typer.Option("--max-pages", min=0, help="Stop after this many pages (0: no limit).")] = 0,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Read-only PAGEMAP_SCAN query.

    Categories: WPALLOWED WRITTEN FILE PRESENT SWAPPED PFNZERO HUGE SOFT_DIRTY GUARD.
    """
    with _errors(), _client(ctx, address) as client:
        page_size_bytes = _page_size_bytes(client)
        result = client.session(session_id).scan(
            start,
            end,
            category_mask=mask,
            category_anyof_mask=anyof,
            category_inverted=inverted,
            return_mask=return_mask,
            max_pages=max_pages,
        )
    rows = [
        {"start_address": s, "end_address": e, "categories": c, "names": _category_names(c)}
        for (s, e), c in zip(result.regions.tolist(), result.categories.tolist(), strict=True)
    ]
    if as_json:
        _print_json({"regions": rows, "complete": result.complete, "resume_address": result.resume_address})
        return
    table = Table("start", "end", "pages", "categories")
    for row in rows:
        n_pages = (row["end_address"] - row["start_address"]) // page_size_bytes
        table.add_row(f"0x{row['start_address']:x}", f"0x{row['end_address']:x}", str(n_pages), " ".join(row["names"]))
    _console.print(table)
    if not result.complete:
        typer.echo(f"incomplete: resume at 0x{result.resume_address:x}")


def _category_names(bits: int) -> list[str]:
    return [member.name or "" for member in PageCategory if bits & member]


@app.command("write-watch")
def write_watch(
    ctx: typer.Context,
    *,
    session_id: SessionArgument,
    view: Annotated[
        str, typer.Argument(help="View name (created if missing; a new view is empty).", show_default=False)
    ],
    base: Annotated[int, typer.Argument(parser=parse_number, help="Base address.", show_default=False)],
    size: Annotated[int, typer.Argument(parser=parse_number, help="Size in bytes (16M, 0x1000).", show_default=False)],
    reset: Annotated[bool, typer.Option("--reset", help="Clear the returned pages in this view.")] = False,
    max_count: Annotated[int, typer.Option("--max-count", min=0, help="At most this many addresses (0: all).")] = 0,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Win32 GetWriteWatch on a named view: the written page addresses."""
    with _errors(), _client(ctx, address) as client:
        watch_view = client.session(session_id).view(view)
        result = watch_view.get_write_watch(base, size, max_count=max_count or None, reset=reset)
    if as_json:
        _print_json({"addresses": result.addresses, "granularity_bytes": result.granularity_bytes})
        return
    for page_address in result.addresses:
        typer.echo(f"0x{page_address:x}")
    _errors_console.print(f"{len(result.addresses)} pages, granularity {result.granularity_bytes}")


view_app = typer.Typer(help="Create, list and delete a session's write-watch views.", no_args_is_help=True)
app.add_typer(view_app, name="view")
ViewArgument = Annotated[str, typer.Argument(help="View name.", show_default=False)]


@view_app.command("create")
def view_create(
    ctx: typer.Context, session_id: SessionArgument, name: ViewArgument, address: AddressOption = None
) -> None:
    """Create a view (empty: it sees the writes made from now on); an existing one is left as it is."""
    with _errors(), _client(ctx, address) as client:
        client.session(session_id).view(name)
    typer.echo(f"view {name} of {session_id}")


@view_app.command("list")
def view_list(
    ctx: typer.Context, session_id: SessionArgument, address: AddressOption = None, as_json: JsonOption = False
) -> None:
    """List a session's views with the written pages each holds."""
    with _errors(), _client(ctx, address) as client:
        views = client.session(session_id).views()
    if as_json:
        _print_json([message_to_json(v) for v in views])
        return
    table = Table("view", "pages")
    for v in views:
        table.add_row(v.view_id, str(v.n_pages))
    _console.print(table)


@view_app.command("delete")
def view_delete(
    ctx: typer.Context, session_id: SessionArgument, name: ViewArgument, address: AddressOption = None
) -> None:
    """Delete a view."""
    with _errors(), _client(ctx, address) as client:
        View(client.session(session_id), name).delete()
    typer.echo(f"deleted view {name} of {session_id}")


@app.command()
def close(
    ctx: typer.Context,
    session_id: SessionArgument,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Also close the sessions of followed descendants.")
    ] = False,
    address: AddressOption = None,
) -> None:
    """Stop tracking (delete the session)."""
    with _errors(), _client(ctx, address) as client:
        client.session(session_id).close(recursive=recursive)
    typer.echo(f"closed {session_id}")


@app.command()
def capabilities(ctx: typer.Context, address: AddressOption = None, as_json: JsonOption = False) -> None:
    """What the daemon's kernel supports."""
    with _errors(), _client(ctx, address) as client:
        caps = client.capabilities()
    data = message_to_json(caps)
    if as_json:
        _print_json(data)
        return
    data["supported_category_mask"] = " ".join(_category_names(caps.supported_category_mask))
    data["uffd_features"] = f"0x{caps.uffd_features:x}"
    data["unpopulated_pte_fix"] = short_name(pb.FixStatus, caps.unpopulated_pte_fix)
    data["pmd_hole_fix"] = short_name(pb.FixStatus, caps.pmd_hole_fix)
    table = Table("capability", "value", box=None)
    for key, value in data.items():
        table.add_row(key, str(value))
    _console.print(table)


@app.command()
def export(
    ctx: typer.Context,
    *,
    session_ids: Annotated[
        list[str] | None, typer.Argument(help="Sessions to export (or --all).", show_default=False)
    ] = None,
    nats_url: Annotated[str, typer.Option("--nats", help="NATS server URL, e.g. nats://127.0.0.1:4222.")],
    follow_all: Annotated[
        bool, typer.Option("--all", help="Every session, and each new one as it is created.")
    ] = False,
    host: Annotated[
        str | None, typer.Option("--host", help="Host token of the subjects [default: this machine's name].")
    ] = None,
    poll_s: Annotated[float, typer.Option("--poll-s", min=0.05, help="How often --all lists sessions.")] = 1.0,
    connect_attempts: Annotated[
        int, typer.Option("--connect-attempts", min=1, help="Tries to reach NATS at start.")
    ] = 8,
    give_up_after_s: Annotated[
        float, typer.Option("--give-up-after-s", min=0, help="Stop when publishing keeps failing this long.")
    ] = 300.0,
    max_age_s: Annotated[float, typer.Option("--max-age-s", min=0, help="Stream max_age when creating it.")] = 7
    * 86400.0,
    max_bytes: Annotated[
        int, typer.Option("--max-bytes", parser=parse_number, help="Stream max_bytes when creating it.")
    ] = 1 << 30,
    address: AddressOption = None,
) -> None:
    """Publish sessions' deltas to NATS JetStream (stream WRITEWATCH) until they end; see docs/fleet.md.

    Exit status: 1 bad input or a daemon error, 3 NATS or JetStream unreachable, 4 the stream
    exists with incompatible settings.
    """
    import asyncio
    import logging

    from ._async_client import AsyncClient
    from .export import Exporter, ExportError, StreamLimits, default_host, run_until_signalled

    if bool(session_ids) == follow_all:
        raise typer.BadParameter("name sessions to export, or give --all (not both)")
    logging.basicConfig(level=logging.INFO, format="writewatch export: %(message)s")
    try:
        connection = _connection(ctx, address)
    except ValueError as error:
        _errors_console.print(f"writewatch export: {error}", markup=False, soft_wrap=True)
        raise typer.Exit(1) from None

    async def run() -> None:
        exporter = Exporter(
            AsyncClient(connection),
            nats_url,
            session_ids=session_ids or (),
            follow_all=follow_all,
            host=host or default_host(),
            limits=StreamLimits(max_age_s=max_age_s, max_bytes=max_bytes),
            poll_interval_s=poll_s,
            connect_attempts=connect_attempts,
            give_up_after_s=give_up_after_s,
        )
        await run_until_signalled(exporter)

    try:
        asyncio.run(run())
    except ExportError as error:
        _errors_console.print(f"writewatch export: {error}", markup=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    except (WriteWatchError, ValueError) as error:
        _errors_console.print(f"writewatch export: {error}", markup=False, soft_wrap=True)
        raise typer.Exit(1) from None


@app.command()
def ping(
    ctx: typer.Context,
    count: Annotated[int, typer.Option("--count", "-c", min=1, help="Round trips to time.")] = 3,
    address: AddressOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check the connection: latency, daemon version, kernel, and who the daemon takes you for."""
    with _errors(), _client(ctx, address) as client:
        latencies_ms: list[float] = []
        for _ in range(count):
            started = time.perf_counter()
            whoami = client.whoami()
            latencies_ms.append((time.perf_counter() - started) * 1000)
        connection = client.connection
    data = {
        "address": connection.target,
        "transport": connection.describe(),
        "latency_ms_min": round(min(latencies_ms), 3),
        "latency_ms_median": round(statistics.median(latencies_ms), 3),
        "latency_ms_first": round(latencies_ms[0], 3),
        "daemon_version": whoami.daemon_version,
        "kernel_version": whoami.kernel_version,
        "identity": whoami.identity,
        "role": short_name(pb.Role, whoami.role),
        "auth_method": short_name(pb.AuthMethod, whoami.auth_method),
        "peer": whoami.peer,
    }
    if as_json:
        _print_json(data)
        return
    table = Table("ping", "", box=None, show_header=False)
    for key, value in data.items():
        table.add_row(key, str(value))
    _console.print(table)


def main() -> None:
    """Console-script entry point."""
    app()
