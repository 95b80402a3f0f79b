"""Distribution statistics of a dataset, computed by DuckDB over its Parquet shards.

Only the columns a dataset has are summarised (missing ones are skipped silently); the row count
is always there. Works on any Parquet dataset directory, not only ours.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from magpie.filters import open_dataset, quote_ident
from magpie.store import ShardStore

CATEGORICAL = (
    "difficulty",
    "input_quality",
    "task_category",
    "language",
    "llama_guard_2",
    "safety",
)
SCORES = (
    "instruct_reward",
    "chosen_reward",
    "rejected_reward",
    "reward_margin",
    "min_neighbor_distance",
)
SHOWN_VALUES = 15  # values per categorical table; the rest are summed into one row


@dataclass
class ValueCount:
    """One value of a categorical column (None for nulls) and its share of all rows."""

    value: str | None
    count: int
    share: float


@dataclass
class NumericSummary:
    """Non-null count, nulls, mean, percentiles (linear interpolation), min and max."""

    count: int
    nulls: int
    mean: float | None
    p5: float | None
    p50: float | None
    p95: float | None
    min: float | None
    max: float | None


@dataclass
class RepeatStats:
    """Rows with `repeat_count > 0`, and rows the `no-duplicates` preset would drop."""

    repeated: int
    repeated_share: float
    duplicates: int | None = None
    duplicates_share: float | None = None


@dataclass
class DatasetStats:
    """Everything `magpie stats` shows; `as_dict()` for JSON."""

    src: str
    rows: int
    columns: list[str]
    categorical: dict[str, list[ValueCount]] = field(default_factory=dict)
    lengths: dict[str, NumericSummary] = field(default_factory=dict)
    scores: dict[str, NumericSummary] = field(default_factory=dict)
    repeats: RepeatStats | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _value_counts(con: duckdb.DuckDBPyConnection, column: str, rows: int) -> list[ValueCount]:
    col = quote_ident(column)
    found = con.sql(
        f"SELECT CAST({col} AS VARCHAR) AS v, count(*) AS n FROM source "
        "GROUP BY v ORDER BY n DESC, v NULLS LAST"
    ).fetchall()
    return [ValueCount(v, n, n / rows if rows else 0.0) for v, n in found]


def _numeric(con: duckdb.DuckDBPyConnection, expr: str, source: str = "source") -> NumericSummary:
    """Summary of a numeric SQL expression over `source` (a view or a subquery)."""
    ((count, nulls, mean, qs, lo, hi),) = con.sql(
        f"SELECT count(x), count_if(x IS NULL), avg(x), "
        f"quantile_cont(x, [0.05, 0.5, 0.95]), min(x), max(x) "
        f"FROM (SELECT CAST({expr} AS DOUBLE) AS x FROM {source})"
    ).fetchall()
    p5, p50, p95 = qs if qs is not None else (None, None, None)
    return NumericSummary(count, nulls, mean, p5, p50, p95, lo, hi)


def _length_exprs(types: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Label -> (SQL expression, FROM) of every length we can measure in this dataset."""
    exprs: dict[str, tuple[str, str]] = {}
    if "instruction_length" in types:
        exprs["instruction_length"] = ('"instruction_length"', "source")
    elif types.get("instruction") == "VARCHAR":
        exprs["instruction_length"] = ('length("instruction")', "source")
    if "response_length" in types:
        exprs["response_length"] = ('"response_length"', "source")
    if types.get("response") == "VARCHAR":
        exprs["response (chars)"] = ('length("response")', "source")
    if types.get("responses") == "VARCHAR[]":
        exprs["responses (chars, each)"] = (
            "length(r)",
            '(SELECT unnest("responses") AS r FROM source)',
        )
    for side in ("chosen", "rejected"):
        kind = types.get(side, "")
        if kind == "VARCHAR":
            exprs[f"{side} (chars)"] = (f"length({quote_ident(side)})", "source")
        elif kind.startswith("STRUCT(") and kind.endswith("[]") and "content" in kind:
            last = f"{quote_ident(side)}[-1].content"
            exprs[f"{side} (chars, last turn)"] = (f"length({last})", "source")
    return exprs


def _repeats(
    con: duckdb.DuckDBPyConnection, types: dict[str, str], rows: int
) -> RepeatStats | None:
    if "repeat_count" not in types:
        return None
    ((repeated,),) = con.sql(
        'SELECT coalesce(count_if("repeat_count" > 0), 0) FROM source'
    ).fetchall()
    stats = RepeatStats(repeated, repeated / rows if rows else 0.0)
    if "min_similar_uuid" in types and "uuid" in types:
        ((dups,),) = con.sql(
            "SELECT coalesce(count_if("
            '"min_similar_uuid" IS NOT NULL AND "min_similar_uuid" <> "uuid"), 0) FROM source'
        ).fetchall()
        stats.duplicates, stats.duplicates_share = dups, dups / rows if rows else 0.0
    return stats


def dataset_stats(src: Path) -> DatasetStats:
    """Row count and the distributions of whichever known columns `src` has."""
    manifest = ShardStore(src).read_manifest() if Path(src).is_dir() else None
    if manifest and manifest.get("complete") and not any(Path(src).glob("*.parquet")):
        return DatasetStats(str(src), int(manifest.get("rows") or 0), [])  # nothing kept
    con = duckdb.connect()
    try:
        columns = open_dataset(Path(src), con)
        types = {k: str(v) for k, v in zip(columns, con.table("source").dtypes, strict=True)}
        ((rows,),) = con.sql("SELECT count(*) FROM source").fetchall()
        stats = DatasetStats(str(src), rows, columns)
        for column in CATEGORICAL:
            if column in types:
                stats.categorical[column] = _value_counts(con, column, rows)
        for label, (expr, source) in _length_exprs(types).items():
            stats.lengths[label] = _numeric(con, expr, source)
        for column in SCORES:
            if column in types:
                stats.scores[column] = _numeric(con, quote_ident(column))
        stats.repeats = _repeats(con, types, rows)
        return stats
    finally:
        con.close()


# ---------------------------------------------------------------------------------------------
# rendering


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _categorical_table(column: str, counts: list[ValueCount]) -> Table:
    table = Table(title=Text(column), title_justify="left")
    table.add_column("value")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    for vc in counts[:SHOWN_VALUES]:
        value = "(null)" if vc.value is None else vc.value.replace("\n", " ")
        table.add_row(Text(value), str(vc.count), f"{vc.share:.1%}")
    rest = counts[SHOWN_VALUES:]
    if rest:
        n, share = sum(v.count for v in rest), sum(v.share for v in rest)
        table.add_row(f"({len(rest)} more values)", str(n), f"{share:.1%}")
    return table


def _numeric_table(title: str, summaries: dict[str, NumericSummary], digits: int) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("column", "count", "nulls", "mean", "p5", "p50", "p95", "min", "max"):
        table.add_column(name, justify="left" if name == "column" else "right")
    for label, s in summaries.items():
        values = (s.mean, s.p5, s.p50, s.p95, s.min, s.max)
        table.add_row(Text(label), str(s.count), str(s.nulls), *(_num(v, digits) for v in values))
    return table


def render_stats(stats: DatasetStats, console: Console) -> None:
    """Print the statistics as rich tables; sections for missing columns are left out."""
    console.print(
        f"[bold]{escape(stats.src)}[/bold]: {stats.rows} rows, {len(stats.columns)} columns"
    )
    for column, counts in stats.categorical.items():
        console.print(_categorical_table(column, counts))
    if stats.lengths:
        console.print(_numeric_table("lengths (characters)", stats.lengths, 1))
    if stats.scores:
        console.print(_numeric_table("scores", stats.scores, 3))
    r = stats.repeats
    if r is not None:
        line = f"repeat_count > 0: {r.repeated} rows ({r.repeated_share:.1%})"
        if r.duplicates is not None:
            line += f"; not their group's representative: {r.duplicates} ({r.duplicates_share:.1%})"
        console.print(Text(line))
