"""Row selection after a filter: top-N by an expression, balanced sampling, seeded shuffles.

All of it runs in DuckDB over the kept rows (no Python loop over rows). A row's random key is
`md5(seed:uuid)` when the dataset has a `uuid` column, so the same seed picks the same rows
whatever the dataset's sharding; without one it is the row's position. Ties always break on the
row's position (file, row in file), so every selection is deterministic for its seed.

Balanced sampling (`balance=COLUMN`, `limit=N`) gives every category an equal share of N; a
category with fewer rows than its share keeps them all and its remainder is shared among the
others ("water filling"). When N does not divide evenly, the extra rows go to the largest
remaining categories' first names in sort order. A null value counts as a category of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from magpie.errors import MagpieError

POSITION = ("__magpie_file", "__magpie_row")
KEY = "__magpie_key"
RANK = "__magpie_rank"
QUOTAS_VIEW = "__magpie_quotas"


@dataclass(frozen=True)
class Selection:
    """What to keep of the rows that pass the filter, and in which order to write them."""

    balance: str | None = None
    """Column whose categories get equal shares of `limit`."""
    limit: int | None = None
    """Rows to keep (after the conditions)."""
    order_by: str | None = None
    """SQL ORDER BY items (e.g. `response_length desc`): top-N by it, written in its order."""
    seed: int = 0
    """Seed of random picks (balanced sampling; a plain limit without order_by)."""
    shuffle_seed: int | None = None
    """Shuffle the selected rows with this seed before writing."""

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 0:
            raise MagpieError(f"--limit must be 0 or more, got {self.limit}")
        if self.balance is not None and self.limit is None:
            raise MagpieError("--balance needs --limit N: the number of rows to share out")
        if self.order_by is not None and not self.order_by.strip():
            raise MagpieError(
                "--order-by is empty: pass an expression, e.g. 'response_length desc'"
            )

    @property
    def active(self) -> bool:
        return bool(
            self.balance or self.limit is not None or self.order_by or self.shuffle_seed is not None
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "balance": self.balance,
            "limit": self.limit,
            "order_by": self.order_by,
            "seed": self.seed,
            "shuffle_seed": self.shuffle_seed,
        }


def balanced_quotas(counts: list[tuple[Any, int]], limit: int) -> list[int]:
    """Rows to take from each (category, available) so the total is min(limit, all rows).

    Equal shares; a category with fewer rows than its share takes them all and the others share
    what it leaves. Extra rows of an uneven split go to the first categories in sort order.
    """
    quotas = [0] * len(counts)
    order = sorted(range(len(counts)), key=lambda i: (counts[i][1], _sort_key(counts[i][0])))
    left = limit
    for position, i in enumerate(order):
        remaining = len(order) - position
        if counts[i][1] <= left // remaining:
            quotas[i] = counts[i][1]
            left -= counts[i][1]
            continue
        rest = sorted(order[position:], key=lambda j: _sort_key(counts[j][0]))
        base, extra = divmod(left, remaining)
        for rank, j in enumerate(rest):
            quotas[j] = base + (1 if rank < extra else 0)
        break
    return quotas


def _sort_key(value: Any) -> tuple[int, str]:
    return (1, "") if value is None else (0, str(value))


def _random_key(seed: int, has_uuid: bool) -> str:
    ident = '"uuid"' if has_uuid else f"concat_ws(':', {POSITION[0]}, {POSITION[1]})"
    return f"md5(concat('{int(seed)}:', coalesce(CAST({ident} AS VARCHAR), '')))"


def _position() -> str:
    return f"{POSITION[0]}, {POSITION[1]}"


def selection_query(
    con: duckdb.DuckDBPyConnection,
    kept_sql: str,
    selection: Selection,
    columns: list[str],
) -> tuple[str, dict[str, Any]]:
    """The SQL that selects from `kept_sql` (rows with POSITION columns) and what it chose.

    For balanced sampling this counts the categories first and registers their quotas on `con`.
    The returned query has the dataset's own columns only.
    """
    has_uuid = "uuid" in columns
    key = _random_key(selection.seed, has_uuid)
    own = ", ".join(f"s.{_ident(c)}" for c in columns)
    within = (
        f"{selection.order_by}, {_position()}" if selection.order_by else f"{KEY}, {_position()}"
    )
    info: dict[str, Any] = {}
    base = f"SELECT *, {key} AS {KEY} FROM ({kept_sql})"
    if selection.balance is not None:
        if selection.balance not in columns:
            raise MagpieError(
                f"--balance {selection.balance}: no such column (columns: {', '.join(columns)})"
            )
        col = _ident(selection.balance)
        counts = con.sql(f"SELECT {col} AS value, count(*) AS n FROM ({kept_sql}) GROUP BY ALL")
        table = counts.to_arrow_table()
        pairs = list(
            zip(table.column("value").to_pylist(), table.column("n").to_pylist(), strict=True)
        )
        quotas = balanced_quotas(pairs, selection.limit or 0)
        con.register(QUOTAS_VIEW, table.append_column("quota", pa.array(quotas, pa.int64())))
        info["balance"] = {
            "column": selection.balance,
            "categories": [
                {"value": v, "available": n, "taken": q}
                for (v, n), q in sorted(
                    zip(pairs, quotas, strict=True), key=lambda p: _sort_key(p[0][0])
                )
            ],
        }
        picked = (
            f"SELECT s.*, row_number() OVER (PARTITION BY s.{col} ORDER BY {within}) AS {RANK} "
            f"FROM ({base}) s"
        )
        chosen = (
            f"SELECT s.* FROM ({picked}) s JOIN {QUOTAS_VIEW} q "
            f"ON s.{col} IS NOT DISTINCT FROM q.value WHERE s.{RANK} <= q.quota"
        )
        order = within if selection.order_by else _position()
    else:
        limit = f" LIMIT {int(selection.limit)}" if selection.limit is not None else ""
        if selection.order_by or selection.limit is not None:
            chosen = f"SELECT * FROM ({base}) s ORDER BY {within}{limit}"
        else:
            chosen = base
        order = within if selection.order_by else _position()
    if selection.shuffle_seed is not None:
        order = f"{_random_key(selection.shuffle_seed, has_uuid)}, {_position()}"
    query = f"SELECT {own} FROM ({chosen}) s ORDER BY {order}"
    return query, info


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
