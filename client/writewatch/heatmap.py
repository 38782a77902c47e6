"""``writewatch heatmap``: a recording drawn as address x time, colour = pages written per cell.

The tracked ranges are laid end to end (the holes between mappings removed), so the picture
is spent on memory the target can write. Needs matplotlib: ``pip install 'writewatch[plot]'``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._watch import format_bytes
from .analysis import LoadedRecording, Pages, coverage, load_recording, merge_ranges, recording_report
from .recording import Recording

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "PLOT_EXTRA_HINT",
    "HeatmapGrid",
    "HeatmapInfo",
    "Layout",
    "figure_colormap",
    "heatmap_grid",
    "render_heatmap",
]

PLOT_EXTRA_HINT = "writewatch heatmap needs matplotlib: pip install 'writewatch[plot]'"
_FIGURE_SIZE_IN = (11.0, 6.0)
_DPI = 100
_AXES_RECT = (0.12, 0.12, 0.58, 0.71)  # left, bottom, width, height in figure fractions
_COLORBAR_RECT = (0.12, 0.885, 0.58, 0.018)
_N_Y_TICKS = 8
_MAX_BOUNDARY_LINES = 64
_N_ANNOTATED = 4


@dataclass(frozen=True)
class Layout:
    """The compacted address axis: segments of pages laid end to end."""

    segments: Pages
    """``(n, 2)`` page numbers ``[start, end)`` of the segments, sorted, holes between them."""
    offsets: np.ndarray[tuple[int], np.dtype[np.int64]]
    """Position of each segment's first page on the axis (a running sum of lengths)."""
    page_size_bytes: int

    @property
    def n_pages(self) -> int:
        """Length of the axis in pages."""
        return int(self.offsets[-1] + self.segments[-1, 1] - self.segments[-1, 0]) if len(self.segments) else 0

    @classmethod
    def of(cls, segments: Pages, page_size_bytes: int) -> Layout:
        """The layout of sorted, disjoint segments."""
        lengths = segments[:, 1] - segments[:, 0]
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return cls(segments, offsets, page_size_bytes)

    def position(self, page: Pages) -> Pages:
        """Axis position of pages that lie inside the segments."""
        index = np.searchsorted(self.segments[:, 0], page, side="right") - 1
        result: Pages = self.offsets[index] + (page - self.segments[index, 0])
        return result

    def address(self, position: float) -> int:
        """Byte address at an axis position (positions past the end map to the last segment's end)."""
        index = int(np.searchsorted(self.offsets, position, side="right")) - 1
        index = min(max(index, 0), len(self.segments) - 1)
        page = self.segments[index, 0] + min(
            position - self.offsets[index], self.segments[index, 1] - self.segments[index, 0]
        )
        return int(page * self.page_size_bytes)


@dataclass(frozen=True)
class HeatmapGrid:
    """The cells of a heatmap and their bounds."""

    cells: np.ndarray[tuple[int, int], np.dtype[np.int64]]
    """Pages written per cell, ``(n_rows, n_cols)``, row 0 at the lowest address."""
    time_edges_s: np.ndarray[tuple[int], np.dtype[np.float64]]
    """Seconds (from the recording's start) bounding the columns."""
    row_edges: np.ndarray[tuple[int], np.dtype[np.int64]]
    """Axis positions (pages) bounding the rows."""
    layout: Layout
    resyncs_s: list[float]
    """When the RESYNC deltas of the time window came (not drawn as writes)."""


@dataclass(frozen=True)
class HeatmapInfo:
    """What :func:`render_heatmap` drew, and where, so a program can read the picture back."""

    grid: HeatmapGrid
    image_size_px: tuple[int, int]
    """(width, height) of the PNG."""
    axes_box_px: tuple[float, float, float, float]
    """(left, top, right, bottom) of the cell area in PNG pixels (origin top left)."""
    busiest: list[dict[str, Any]]

    def y_px(self, address: int) -> float:
        """PNG pixel row (from the top) of a tracked byte address."""
        layout = self.grid.layout
        page = np.array([address // layout.page_size_bytes], dtype=np.int64)
        fraction = float(layout.position(page)[0]) / layout.n_pages
        _, top, _, bottom = self.axes_box_px
        return bottom - fraction * (bottom - top)


def heatmap_grid(
    loaded: LoadedRecording,
    *,
    address_range: tuple[int, int] | None = None,
    from_s: float | None = None,
    to_s: float | None = None,
    max_rows: int = 256,
    max_cols: int = 300,
) -> HeatmapGrid:
    """Count the written pages per cell; ValueError when no page was written in the selection."""
    page = loaded.page_size_bytes
    t0 = 0.0 if from_s is None else from_s
    t1 = loaded.duration_s if to_s is None else to_s
    if t1 <= t0:
        raise ValueError(f"--from {t0:g} s must be before --to {t1:g} s")
    lo, hi = (
        (0, np.iinfo(np.int64).max)
        if address_range is None
        else (address_range[0] // page, -(-address_range[1] // page))
    )
    if hi <= lo:
        raise ValueError("the address range is empty")
    times_s: list[float] = []
    chosen: list[Pages] = []
    resyncs_s: list[float] = []
    for delta, pages in zip(loaded.deltas, loaded.written, strict=True):
        when_s = loaded.seconds(delta)
        if not t0 <= when_s <= t1:
            continue
        if delta.resync:
            resyncs_s.append(when_s)
            continue
        clipped = np.clip(pages, lo, hi)
        clipped = clipped[clipped[:, 1] > clipped[:, 0]]
        if len(clipped):
            times_s.append(when_s)
            chosen.append(clipped)
    if not chosen:
        where = "" if address_range is None and from_s is None and to_s is None else " in the selected range and time"
        raise ValueError(
            f"{loaded.recording.path}: no page was written{where} ({len(loaded.deltas)} deltas, "
            f"{sum(d.resync for d in loaded.deltas)} of them RESYNCs): nothing to draw"
        )
    tracked = np.clip(loaded.tracked, lo, hi)
    tracked = tracked[tracked[:, 1] > tracked[:, 0]]
    layout = Layout.of(merge_ranges(np.concatenate([tracked, *chosen]), join_touching=True), page)
    n_rows = min(max_rows, layout.n_pages)
    row_edges = np.round(np.linspace(0, layout.n_pages, n_rows + 1)).astype(np.int64)
    # About two harvests per column: one per column leaves empty columns wherever ticks jitter.
    n_cols = min(max_cols, max(1, len(set(times_s)) // 2))
    time_edges_s = np.linspace(t0, t1, n_cols + 1)
    column = np.minimum(np.searchsorted(time_edges_s, times_s, side="right") - 1, n_cols - 1)
    grid = np.zeros((n_rows, n_cols), dtype=np.int64)
    for col in np.unique(column).tolist():
        regions = np.concatenate([chosen[i] for i in np.flatnonzero(column == col).tolist()])
        starts = layout.position(regions[:, 0])
        grid[:, col] = coverage(np.stack([starts, starts + regions[:, 1] - regions[:, 0]], axis=1), row_edges)
    return HeatmapGrid(grid, time_edges_s, row_edges, layout, resyncs_s)


def render_heatmap(
    path_or_recording: str | os.PathLike[str] | Recording,
    output: str | os.PathLike[str],
    *,
    address_range: tuple[int, int] | None = None,
    from_s: float | None = None,
    to_s: float | None = None,
) -> HeatmapInfo:
    """Draw a recording into a PNG at ``output``; ``address_range`` (bytes) and ``from_s``/``to_s`` zoom.

    Raises ImportError (naming the ``writewatch[plot]`` extra) without matplotlib, ValueError
    when there is nothing to draw, the reader's errors for a bad file.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap, LogNorm
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        raise ImportError(PLOT_EXTRA_HINT) from None
    loaded = load_recording(path_or_recording)
    grid = heatmap_grid(loaded, address_range=address_range, from_s=from_s, to_s=to_s)
    cells, time_edges_s, layout = grid.cells, grid.time_edges_s, grid.layout
    report = recording_report(loaded)
    figure = Figure(figsize=_FIGURE_SIZE_IN, dpi=_DPI)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_axes(_AXES_RECT)
    # Start the colour map above its black end, so a cell written once stays visible on the
    # black of the cells never written.
    colours = ListedColormap(figure_colormap()(np.linspace(0.15, 1.0, 256))).with_extremes(bad="black")
    peak = max(int(cells.max()), 2)
    image = axes.imshow(
        np.ma.masked_equal(cells, 0),
        origin="lower",
        aspect="auto",
        interpolation="nearest",
        extent=(float(time_edges_s[0]), float(time_edges_s[-1]), 0.0, float(layout.n_pages)),
        cmap=colours,
        norm=LogNorm(vmin=1, vmax=peak),
    )
    axes.set_facecolor("black")
    colorbar = figure.colorbar(image, cax=figure.add_axes(_COLORBAR_RECT), orientation="horizontal")
    colorbar.set_label("pages written per cell (log scale)", fontsize=8)
    colorbar.ax.tick_params(labelsize=7)
    colorbar.ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    colorbar.ax.xaxis.set_minor_formatter(NullFormatter())
    colorbar.ax.xaxis.set_label_position("top")
    _address_axis(axes, layout)
    axes.set_xlabel("seconds since the recording started")
    for when_s in grid.resyncs_s:
        axes.axvline(when_s, color="#39c5e6", linestyle="--", linewidth=0.8)
        axes.text(when_s, layout.n_pages, " RESYNC", color="#39c5e6", fontsize=7, va="top", ha="left")
    session = loaded.recording.session
    cell_pages = layout.n_pages / cells.shape[0]
    cell_s = (time_edges_s[-1] - time_edges_s[0]) / cells.shape[1]
    figure.suptitle(
        f"{session.comm or 'process'} (pid {session.pid}), session {session.session_id}: "
        f"{report['n_written_pages']:,} pages written, working set {format_bytes(report['working_set_bytes'])}",
        fontsize=10,
        x=0.41,
        y=0.985,
    )
    figure.text(
        0.41,
        0.012,
        f"cell: {format_bytes(cell_pages * layout.page_size_bytes)} x {cell_s * 1000:.0f} ms; "
        f"{len(layout.segments)} address segments laid end to end (holes removed)",
        ha="center",
        fontsize=7,
        color="#555555",
    )
    busiest = _busiest_in_view(report["busiest"], layout, address_range)
    _annotate(axes, layout, busiest)
    canvas.draw()  # type: ignore[no-untyped-call]  # matplotlib leaves the Agg canvas untyped
    width_px, height_px = (int(v) for v in canvas.get_width_height())
    box = axes.get_window_extent()
    canvas.print_png(os.fspath(output))  # type: ignore[no-untyped-call]
    return HeatmapInfo(
        grid=grid,
        image_size_px=(width_px, height_px),
        axes_box_px=(float(box.x0), height_px - float(box.y1), float(box.x1), height_px - float(box.y0)),
        busiest=busiest,
    )


def figure_colormap() -> Any:
    """The perceptually uniform map the cells use (dark: few pages, bright: many)."""
    from matplotlib import colormaps

    return colormaps["inferno"]


def _address_axis(axes: Axes, layout: Layout) -> None:
    positions = np.unique(np.round(np.linspace(0, layout.n_pages, _N_Y_TICKS)))
    axes.set_yticks(positions, [f"0x{layout.address(float(p)):x}" for p in positions], fontsize=7, family="monospace")
    axes.set_ylabel("address (tracked ranges, holes removed)")
    if len(layout.segments) <= _MAX_BOUNDARY_LINES:
        for offset in layout.offsets[1:].tolist():
            axes.axhline(offset, color="#777777", linewidth=0.4, alpha=0.8)


def _busiest_in_view(
    busiest: list[dict[str, Any]], layout: Layout, address_range: tuple[int, int] | None
) -> list[dict[str, Any]]:
    page = layout.page_size_bytes
    shown = []
    for row in busiest:
        start, end = row["start_address"], row["end_address"]
        if address_range is not None:
            start, end = max(start, address_range[0]), min(end, address_range[1])
        if end > start:
            shown.append(row | {"start_address": start // page * page, "end_address": -(-end // page) * page})
    return shown[:_N_ANNOTATED]


def _annotate(axes: Axes, layout: Layout, busiest: list[dict[str, Any]]) -> None:
    """Brackets beside the busiest ranges, labels spread so they never overlap."""
    page = layout.page_size_bytes
    spans = []
    for rank, row in enumerate(busiest, 1):
        first, last = (
            float(layout.position(np.array([row["start_address"] // page], dtype=np.int64))[0]),
            float(layout.position(np.array([row["end_address"] // page - 1], dtype=np.int64))[0]) + 1,
        )
        spans.append((rank, row, first, last))
    spans.sort(key=lambda item: (item[2] + item[3]) / 2)
    labels_y = _spread([(first + last) / 2 for _, _, first, last in spans], layout.n_pages * 0.09, layout.n_pages)
    for (rank, row, first, last), label_y in zip(spans, labels_y, strict=True):
        middle = (first + last) / 2
        transform = axes.get_yaxis_transform()  # x in axes fraction, y in data
        axes.plot([1.01, 1.01], [first, last], transform=transform, color="#d62728", linewidth=2.5, clip_on=False)
        size = format_bytes(row["end_address"] - row["start_address"])
        axes.annotate(
            f"#{rank} 0x{row['start_address']:x}-0x{row['end_address']:x}\n"
            f"{row['n_written_pages']:,} pages ({row['share']:.0%}), {size} range",
            xy=(1.01, middle),
            xycoords=transform,
            xytext=(1.04, label_y),
            textcoords=transform,
            fontsize=7,
            va="center",
            family="monospace",
            arrowprops={"arrowstyle": "-", "color": "#d62728", "linewidth": 0.6},
            annotation_clip=False,
        )


def _spread(wanted: list[float], gap: float, top: float) -> list[float]:
    """Label heights as close to ``wanted`` (ascending) as ``gap`` apart allows, inside [0, top]."""
    placed: list[float] = []
    for y in wanted:
        placed.append(max(y, placed[-1] + gap) if placed else max(y, 0.0))
    # Pushed past the top: move down from there, keeping the gaps.
    for i in range(len(placed) - 1, -1, -1):
        ceiling = top if i == len(placed) - 1 else placed[i + 1] - gap
        placed[i] = min(placed[i], ceiling)
    return placed
