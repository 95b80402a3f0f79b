"""PNG plots of a dataset's distributions for its card (matplotlib, non-interactive Agg backend).

Every figure is `card.PLOT_SIZE` pixels; values come from DuckDB over the Parquet shards, so only
the plotted columns are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

from magpie.filters import open_dataset, quote_ident
from magpie.store import atomic_write_bytes

SHOWN_BARS = 15


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    from magpie.card import _DPI, PLOT_SIZE

    fig = Figure(figsize=(PLOT_SIZE[0] / _DPI, PLOT_SIZE[1] / _DPI), dpi=_DPI, layout="constrained")
    return fig, fig.add_subplot()


def _save(fig: Any, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")  # no bbox_inches: the size stays PLOT_SIZE
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _short(label: str, width: int = 28) -> str:
    label = " ".join(label.split())
    label = label if len(label) <= width else label[: width - 1] + "…"
    return label.replace("$", r"\$")  # model text is never mathtext


def bar_plot(path: Path, title: str, counts: list[Any]) -> Path:
    """Horizontal bars of the most frequent values (the rest summed into one bar)."""
    fig, ax = _figure()
    shown = counts[:SHOWN_BARS]
    labels = ["(null)" if v.value is None else _short(v.value) for v in shown]
    values = [v.count for v in shown]
    rest = counts[SHOWN_BARS:]
    if rest:
        labels.append(f"({len(rest)} more)")
        values.append(sum(v.count for v in rest))
    ax.barh(range(len(values))[::-1], values, color="#4c72b0")
    ax.set_yticks(range(len(values))[::-1], labels, fontsize=8)
    ax.set_xlabel("rows")
    ax.set_title(title)
    return _save(fig, path)


def histogram(
    path: Path, title: str, series: dict[str, list[float]], xlabel: str, log: bool = False
) -> Path:
    """Overlaid histograms of one or more numeric series."""
    import numpy as np

    fig, ax = _figure()
    values = [v for s in series.values() for v in s]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if log:
        lo, hi = max(lo, 1.0), max(hi, 2.0)
        bins = np.geomspace(lo, hi, 40)
        ax.set_xscale("log")
    else:
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 40)
    for label, data in series.items():
        if data:
            ax.hist(data, bins=bins, alpha=0.55, label=f"{label} (n={len(data):,})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.set_title(title)
    if len(series) > 1 or values:
        ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def _column(con: duckdb.DuckDBPyConnection, expr: str, source: str = "source") -> list[float]:
    rows = con.sql(f"SELECT CAST({expr} AS DOUBLE) FROM {source}").fetchall()
    return [r[0] for r in rows if r[0] is not None]


def draw_plots(root: Path, plots_dir: Path, stats: Any) -> list[Path]:
    """Every plot the dataset's columns allow, into `plots_dir`; returns the files written."""
    from magpie.stats import _length_exprs

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = [
        bar_plot(plots_dir / f"{column}.png", column, counts)
        for column, counts in stats.categorical.items()
        if counts
    ]
    con = duckdb.connect()
    try:
        columns = open_dataset(root, con)
        types = {k: str(v) for k, v in zip(columns, con.table("source").dtypes, strict=True)}
        lengths = {
            label: _column(con, expr, source)
            for label, (expr, source) in _length_exprs(types).items()
        }
        if any(lengths.values()):
            path = plots_dir / "lengths.png"
            written.append(histogram(path, "lengths", lengths, "characters (log scale)", log=True))
        if {"chosen_reward", "rejected_reward"} <= set(types):
            series = {s: _column(con, quote_ident(f"{s}_reward")) for s in ("chosen", "rejected")}
            written.append(histogram(plots_dir / "rewards.png", "rewards", series, "reward"))
        for column in ("reward_margin", "instruct_reward", "min_neighbor_distance"):
            if column in types:
                series = {column: _column(con, quote_ident(column))}
                if series[column]:
                    path = plots_dir / f"{column}.png"
                    written.append(histogram(path, column, series, column))
    finally:
        con.close()
    for stale in set(plots_dir.glob("*.png")) - set(written):  # plots of columns now gone
        stale.unlink()
    return written
