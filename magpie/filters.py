"""SQL filters over datasets: a `--where` expression and named presets, run by DuckDB.

A filter keeps the rows for which *every* condition is true (a condition that is NULL for a row,
e.g. over a missing tag value, counts as false). It reports, per condition, how many rows fail it
on its own and how many are left after applying the conditions in order (the funnel), and writes
the kept rows as a dataset like any other stage's: Parquet shards committed atomically plus
`.magpie/manifest.json`, so later stages accept it as input.

Presets are lists of named SQL conditions whose `{placeholders}` are parameters (with defaults,
overridable through `params`) or columns. A column placeholder resolves to the column, to a
fallback expression when the column is missing (`instruction_length` -> `length(instruction)`),
or to a one-line error naming the command that produces it.
"""

from __future__ import annotations

import hashlib
import json
import math
import string
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table
from rich.text import Text

from magpie import __version__, locking
from magpie.errors import MagpieError
from magpie.selection import POSITION, Selection, selection_query
from magpie.store import ShardStore

DEFAULT_SHARD_ROWS = 50_000
QUALITY_LEVELS = ("very poor", "poor", "average", "good", "excellent")
DIFFICULTY_LEVELS = ("very easy", "easy", "medium", "hard", "very hard")
LEVELS = {"quality": QUALITY_LEVELS, "difficulty": DIFFICULTY_LEVELS}
_DISABLED = {"none", "off", "null", ""}  # a parameter set to one of these turns its condition off
_KINDS = {
    "float": "a number",
    "int": "a whole number",
    "str": "text",
    "quality": "a level",
    "difficulty": "a level",
}

TAG_FLAG = "magpie tag --tags "
# The command that adds a column, for the "column is missing" error. Keep in step with the CLI.
PRODUCERS: dict[str, str] = {
    "uuid": "magpie instructions",
    "instruction": "magpie instructions",
    "difficulty": "magpie tag --tags difficulty",
    "input_quality": "magpie tag --tags quality",
    "task_category": "magpie tag --tags category",
    "llama_guard_2": "magpie tag --tags safety",
    "safety": "magpie tag --tags safety",
    "instruct_reward": "magpie tag --tags reward",
    "language": "magpie tag --tags language",
    "min_neighbor_distance": "magpie tag --tags neighbors",
    "repeat_count": "magpie tag --tags neighbors",
    "min_similar_uuid": "magpie tag --tags neighbors",
    "responses": "magpie responses",
    "response_length": "magpie responses --n 1",
    "chosen": "magpie pairs",
    "rejected": "magpie pairs",
    "reward_margin": "magpie pairs",
}
# Expressions that stand in for a missing column: column -> (column they need, expression).
FALLBACKS: dict[str, tuple[str, str]] = {
    "instruction_length": ("instruction", 'length("instruction")'),
}


# ---------------------------------------------------------------------------------------------
# presets


@dataclass(frozen=True)
class Param:
    """A preset parameter: `kind` is float, int, str, or quality / difficulty (a minimum level)."""

    name: str
    default: Any
    kind: str
    help: str


@dataclass(frozen=True)
class Preset:
    """Named conditions (name, SQL template) and the parameters their templates use."""

    name: str
    help: str
    conditions: tuple[tuple[str, str], ...]
    params: tuple[Param, ...] = ()


_NO_DUPLICATES = (
    "no_duplicates",
    "{min_similar_uuid} IS NULL OR {min_similar_uuid} = {uuid}",
)
_ENGLISH = ("language", "upper({language}) = upper({lang})")
_LANG = Param("lang", "EN", "str", "ISO 639-1 code the `language` column must equal")
_LENGTHS = (
    "instruction_length",
    "{instruction_length} BETWEEN {min_length} AND {max_length}",
)
_LENGTH_PARAMS = (
    Param("min_length", 10, "int", "fewest instruction characters"),
    Param("max_length", 4096, "int", "most instruction characters"),
)
_MIN_QUALITY = Param("min_quality", "good", "quality", "lowest input_quality kept")

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "magpie-filtered",
            "the rules of Magpie's 300K filter (data_sft/data_filter.ipynb): input quality good or "
            "better, instruct_reward > -10, instruction not ending with ':', one row per "
            "near-duplicate group. The notebook then keeps the longest responses: add "
            "--order-by 'response_length desc' --limit 300000 --shuffle-seed 42",
            (
                ("input_quality", "{input_quality} IN {min_quality}"),
                ("instruct_reward", "{instruct_reward} > {min_instruct_reward}"),
                ("complete_instruction", "NOT ends_with({instruction}, ':')"),
                _NO_DUPLICATES,
                ("min_neighbor_distance", "{min_neighbor_distance} > {min_distance}"),
            ),
            (
                _MIN_QUALITY,
                Param("min_instruct_reward", -10.0, "float", "instruct_reward must exceed it"),
                Param("min_distance", None, "float", "min_neighbor_distance must exceed it (off)"),
            ),
        ),
        Preset(
            "magpie-dpo-selection",
            "the instruction selection of Magpie's DPO sets (magpie issue #36): difficulty medium "
            "or harder, input quality good or better, instruct_reward >= -5. The maintainers then "
            "balanced task categories: add --balance task_category --limit 100000 --seed 0",
            (
                ("difficulty", "{difficulty} IN {min_difficulty}"),
                ("input_quality", "{input_quality} IN {min_quality}"),
                ("instruct_reward", "{instruct_reward} >= {min_instruct_reward}"),
            ),
            (
                Param("min_difficulty", "medium", "difficulty", "lowest difficulty kept"),
                _MIN_QUALITY,
                Param("min_instruct_reward", -5.0, "float", "lowest instruct_reward kept"),
            ),
        ),
        Preset(
            "instruction-length",
            "instructions of min_length..max_length characters",
            (_LENGTHS,),
            _LENGTH_PARAMS,
        ),
        Preset(
            "dpo-margin",
            "preference pairs with both sides present and a reward margin of at least min_margin",
            (
                ("has_pair", "{chosen} IS NOT NULL AND {rejected} IS NOT NULL"),
                ("reward_margin", "{reward_margin} >= {min_margin}"),
            ),
            (Param("min_margin", 0.05, "float", "smallest chosen - rejected reward kept"),),
        ),
        Preset("english", "rows whose `language` is lang (default EN)", (_ENGLISH,), (_LANG,)),
        Preset(
            "no-duplicates",
            "one representative per near-duplicate group (min_similar_uuid null or own uuid)",
            (_NO_DUPLICATES,),
        ),
        Preset("safe", "rows Llama Guard 2 rated safe", (("safe", "{llama_guard_2} = 'safe'"),)),
    )
}


def describe_presets() -> list[tuple[str, str, list[str]]]:
    """(name, help, ["param=default: help", ...]) for every preset, for `--list-presets`."""
    return [
        (p.name, p.help, [f"{q.name}={q.default}: {q.help}" for q in p.params])
        for p in PRESETS.values()
    ]


# ---------------------------------------------------------------------------------------------
# SQL helpers


def quote_ident(name: str) -> str:
    """A column name as a DuckDB identifier."""
    return '"' + name.replace('"', '""') + '"'


def _literal(value: Any, param: Param) -> str:
    """A parameter value as SQL."""
    if param.kind in LEVELS:
        levels = LEVELS[param.kind]
        kept = levels[levels.index(value) :]
        return "(" + ", ".join(f"'{level}'" for level in kept) + ")"
    if param.kind == "str":
        return "'" + str(value).replace("'", "''") + "'"
    return repr(value)


def _coerce(value: Any, param: Param) -> Any:
    """A parameter override (a string from the command line, or a number) in its kind."""
    if value is None or (isinstance(value, str) and value.strip().lower() in _DISABLED):
        return None
    bad = f"parameter {param.name} must be {_KINDS[param.kind]}, got {value!r}"
    if param.kind in LEVELS:
        if str(value).lower() not in LEVELS[param.kind]:
            raise MagpieError(f"{bad}: use one of {', '.join(LEVELS[param.kind])}")
        return str(value).lower()
    if param.kind == "str":
        return str(value)
    try:
        number = int(value) if param.kind == "int" else float(value)
    except (TypeError, ValueError):
        raise MagpieError(bad) from None
    if not math.isfinite(number):
        raise MagpieError(f"{bad} (a finite number)")
    return number


def resolve_params(presets: Sequence[str], params: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults of the chosen presets' parameters with `params` applied; unknown names fail."""
    declared: dict[str, Param] = {}
    for name in presets:
        if name not in PRESETS:
            raise MagpieError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
        declared.update({p.name: p for p in PRESETS[name].params})
    unknown = sorted(set(params or {}) - set(declared))
    if unknown:
        known = ", ".join(declared) or "none"
        raise MagpieError(
            f"unknown parameter {', '.join(unknown)} for preset(s) "
            f"{', '.join(presets) or '(none)'} (their parameters: {known})"
        )
    values = {name: p.default for name, p in declared.items()}
    values.update({k: _coerce(v, declared[k]) for k, v in (params or {}).items()})
    return values


# ---------------------------------------------------------------------------------------------
# conditions


@dataclass(frozen=True)
class Condition:
    """One SQL boolean expression and where it came from (`where` or a preset's name)."""

    name: str
    sql: str
    source: str

    @property
    def label(self) -> str:
        return self.name if self.source == "where" else f"{self.source}:{self.name}"


def _missing_message(missing: dict[str, str]) -> str:
    """One line: which columns are missing, for which presets, and the commands that add them."""
    names, presets = list(missing), sorted(set(missing.values()))
    head = f"{names[0]} is missing" if len(names) == 1 else f"{', '.join(names)} are missing"
    head += f" (needed by preset {', '.join(presets)})"
    produced = [PRODUCERS[c] for c in names if c in PRODUCERS]
    commands = list(dict.fromkeys(p for p in produced if not p.startswith(TAG_FLAG)))
    flags = dict.fromkeys(p.removeprefix(TAG_FLAG) for p in produced if p.startswith(TAG_FLAG))
    if flags:
        commands.append(TAG_FLAG + ",".join(flags))
    fixes = [f"run {' and '.join(f'`{c}`' for c in commands)} first"] if commands else []
    unknown = [c for c in names if c not in PRODUCERS]
    if unknown:
        fixes.append(f"add {', '.join(unknown)} or drop the preset")
    return f"{head}: {'; '.join(fixes)}"


def build_conditions(
    where: str | None,
    presets: Sequence[str],
    params: dict[str, Any],
    columns: Sequence[str],
) -> tuple[list[Condition], list[str]]:
    """The conditions to apply, in order, and the labels of those skipped (a parameter is off).

    `params` are resolved values (see :func:`resolve_params`); a column a preset needs that the
    dataset lacks, with no fallback, raises one error naming every such column and its producer.
    """
    have = set(columns)
    conditions: list[Condition] = []
    skipped: list[str] = []
    missing: dict[str, str] = {}
    for name in presets:
        preset = PRESETS[name]
        declared = {p.name: p for p in preset.params}
        for cond_name, template in preset.conditions:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
            values: dict[str, str] = {}
            if any(params.get(f) is None for f in fields & set(declared)):
                skipped.append(f"{name}:{cond_name}")
                continue
            for f in sorted(fields):
                if f in declared:
                    values[f] = _literal(params[f], declared[f])
                elif f in have:
                    values[f] = quote_ident(f)
                elif f in FALLBACKS and FALLBACKS[f][0] in have:
                    values[f] = FALLBACKS[f][1]
                else:
                    missing.setdefault(f, name)
            if not missing:
                conditions.append(Condition(cond_name, template.format(**values), name))
    if missing:
        raise MagpieError(_missing_message(missing))
    if where is not None and where.strip():
        conditions.insert(0, Condition("where", where.strip(), "where"))
    return conditions, skipped


def _as_bool(condition: Condition) -> str:
    return f"coalesce(CAST(({condition.sql}) AS BOOLEAN), false)"


# ---------------------------------------------------------------------------------------------
# datasets


def parquet_files(src: Path) -> list[Path]:
    """The Parquet files of a dataset: a file, a directory's top level, or else its subfolders.

    Hidden files and `.magpie/` (rejected rows) are left out.
    """
    src = Path(src)
    if not src.exists():
        raise MagpieError(f"{src} does not exist: pass a dataset directory or a .parquet file")
    if src.is_file():
        return [src]
    files = sorted(p for p in src.glob("*.parquet") if not p.name.startswith("."))
    if not files:
        files = sorted(
            p
            for p in src.rglob("*.parquet")
            if not any(part.startswith(".") for part in p.relative_to(src).parts)
        )
    if not files:
        raise MagpieError(f"{src} holds no .parquet files: run the stage that writes it first")
    return files


def open_dataset(src: Path, con: duckdb.DuckDBPyConnection) -> list[str]:
    """Register `src`'s Parquet files as the view `source` on `con`; return its column names.

    An incomplete magpie dataset (its manifest says so) is refused.
    """
    manifest = ShardStore(src).read_manifest() if Path(src).is_dir() else None
    if manifest is not None and not manifest.get("complete", True):
        raise MagpieError(
            f"{src} is incomplete: rerun the command that writes it to finish it first"
        )
    files = parquet_files(src)
    try:
        rel = con.read_parquet([str(f) for f in files], union_by_name=True)
        rel.create_view("source")
    except duckdb.Error as exc:
        raise MagpieError(f"cannot read {src}: {_first_line(exc)}") from None
    return list(rel.columns)


def open_keyed(src: Path, con: duckdb.DuckDBPyConnection, columns: Sequence[str]) -> str:
    """A view of `src` with each row's position (file number, row in file); returns its name.

    Selections order and break ties by it, so they do not depend on DuckDB's scan order.
    """
    clash = [c for c in columns if c in (*POSITION, "filename", "file_row_number")]
    if clash:
        raise MagpieError(
            f"cannot select rows of a dataset with a column named {clash[0]}: rename it first"
        )
    files = [str(f) for f in parquet_files(src)]
    names = "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"
    try:
        con.sql(
            f"CREATE OR REPLACE TEMP VIEW keyed AS SELECT * EXCLUDE (filename, file_row_number), "
            f"list_position({names}, filename) AS {POSITION[0]}, "
            f"file_row_number AS {POSITION[1]} "
            f"FROM read_parquet({names}, union_by_name = true, filename = true, "
            "file_row_number = true)"
        )
    except duckdb.Error as exc:
        raise MagpieError(f"cannot read {src}: {_first_line(exc)}") from None
    return "keyed"


def _selection_query(
    con: duckdb.DuckDBPyConnection, kept_sql: str, selection: Selection, columns: Sequence[str]
) -> tuple[str, dict[str, Any]]:
    """The selection's SQL, checked first so a bad --order-by is one line naming the columns."""
    try:
        query, info = selection_query(con, kept_sql, selection, list(columns))
        if len(con.extract_statements(query)) != 1:
            raise MagpieError("--order-by must be an ORDER BY expression, not statements")
        con.sql(f"SELECT * FROM ({query}) LIMIT 0").fetchall()
    except duckdb.Error as exc:
        raise _sql_error(exc, "selection (--order-by / --balance)", columns) from None
    return query, info


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _sql_error(exc: duckdb.Error, what: str, columns: Sequence[str]) -> MagpieError:
    return MagpieError(f"{what} failed: {_first_line(exc)} (columns: {', '.join(columns)})")


# ---------------------------------------------------------------------------------------------
# counting


@dataclass
class ConditionCount:
    """What one condition did: `removed_alone` rows fail it; `left_after` pass it and all before."""

    name: str
    source: str
    sql: str
    removed_alone: int
    left_after: int
    removed_step: int = 0

    @property
    def label(self) -> str:
        return self.name if self.source == "where" else f"{self.source}:{self.name}"


@dataclass
class FilterReport:
    """Counts of a filter: `kept_rows == conditions[-1].left_after` and the steps add up."""

    src: Path
    out: Path | None
    input_rows: int
    kept_rows: int
    conditions: list[ConditionCount]
    skipped: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    shards: int = 0
    seconds: float = 0.0
    selected_rows: int | None = None
    """Rows written after the selection step (top-N, balanced sampling); None without one."""
    selection: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the CLI."""
        share = self.kept_rows / self.input_rows if self.input_rows else 0.0
        where = f" to {self.out} ({self.shards} shard(s))" if self.out else ""
        picked = "" if self.selected_rows is None else f", selected {self.selected_rows}"
        return f"kept {self.kept_rows} of {self.input_rows} rows ({share:.1%}){picked}{where}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "input_rows": self.input_rows,
            "kept_rows": self.kept_rows,
            "params": self.params,
            "skipped": self.skipped,
            "selected_rows": self.selected_rows,
            "selection": self.selection,
            "conditions": [
                {
                    "name": c.label,
                    "sql": c.sql,
                    "removed_alone": c.removed_alone,
                    "removed_step": c.removed_step,
                    "left_after": c.left_after,
                }
                for c in self.conditions
            ],
        }


def _check_each(
    con: duckdb.DuckDBPyConnection, conditions: Sequence[Condition], columns: Sequence[str]
) -> None:
    """Bind every condition on its own so an error names the one at fault."""
    for cond in conditions:
        try:
            single = len(con.extract_statements(f"SELECT ({cond.sql})")) == 1
            if single:
                con.sql(f"SELECT {_as_bool(cond)} FROM source LIMIT 0").fetchall()
        except duckdb.Error as exc:
            raise _sql_error(exc, _what(cond), columns) from None
        if not single:
            raise MagpieError(f"{_what(cond)} must be one SQL expression, not statements")


def _what(cond: Condition) -> str:
    return "--where" if cond.source == "where" else f"preset {cond.source} condition {cond.name}"


def count_conditions(
    con: duckdb.DuckDBPyConnection, conditions: Sequence[Condition], columns: Sequence[str]
) -> tuple[int, list[ConditionCount]]:
    """Input rows and each condition's counts, in one scan of the view `source`."""
    _check_each(con, conditions, columns)
    flags = ", ".join(f"{_as_bool(c)} AS c{i}" for i, c in enumerate(conditions))
    alone = [f"count_if(NOT c{i})" for i in range(len(conditions))]
    funnel = [
        "count_if(" + " AND ".join(f"c{j}" for j in range(i + 1)) + ")"
        for i in range(len(conditions))
    ]
    inner = f"SELECT {flags} FROM source" if conditions else "SELECT 1 FROM source"
    query = f"SELECT {', '.join(['count(*)', *alone, *funnel])} FROM ({inner})"
    try:
        (row,) = con.sql(query).fetchall()
    except duckdb.Error as exc:
        raise _sql_error(exc, "filter", columns) from None
    total, n = row[0], len(conditions)
    counts, previous = [], total
    for i, cond in enumerate(conditions):
        left = row[1 + n + i]
        counts.append(
            ConditionCount(cond.name, cond.source, cond.sql, row[1 + i], left, previous - left)
        )
        previous = left
    return total, counts


def plan_filter(
    src: Path,
    where: str | None = None,
    presets: Sequence[str] = (),
    params: dict[str, Any] | None = None,
) -> FilterReport:
    """Count what a filter would keep, without writing anything (`--dry-run`)."""
    con = duckdb.connect()
    try:
        report, _, _ = _plan(con, Path(src), where, presets, params)
        return report
    finally:
        con.close()


def _plan(
    con: duckdb.DuckDBPyConnection,
    src: Path,
    where: str | None,
    presets: Sequence[str],
    params: dict[str, Any] | None,
    selecting: bool = False,
) -> tuple[FilterReport, list[Condition], list[str]]:
    resolved = resolve_params(presets, params)
    columns = open_dataset(src, con)
    conditions, skipped = build_conditions(where, presets, resolved, columns)
    if not conditions and not selecting:
        raise MagpieError(
            "nothing to filter by: pass --where EXPR and/or --preset NAME "
            "(or --limit / --balance / --order-by to select rows)"
        )
    total, counts = count_conditions(con, conditions, columns)
    kept = counts[-1].left_after if counts else total
    report = FilterReport(src, None, total, kept, counts, skipped, resolved)
    return report, conditions, columns


# ---------------------------------------------------------------------------------------------
# writing


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse an --out that overlaps the source, or that holds anything unless `overwrite`."""
    s, o = src.resolve(), out.resolve()
    if s == o or s.is_relative_to(o) or o.is_relative_to(s):
        raise MagpieError(f"--out {out} overlaps the source {src}: pick another --out")
    if o.is_file():
        raise MagpieError(f"--out {out} is a file: pass a directory")
    if o.is_dir() and any(o.iterdir()) and not overwrite:
        raise MagpieError(
            f"{out} is not empty: pick another --out, or pass --overwrite to replace its contents"
        )


def _source_identity(src: Path) -> str:
    """The source's config hash when it is ours, else a digest of its files' names/sizes/mtimes."""
    manifest = ShardStore(src).read_manifest() if src.is_dir() else None
    if manifest and manifest.get("config_hash"):
        return str(manifest["config_hash"])
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in parquet_files(src)]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def _source_schema(src: Path) -> pa.Schema | None:
    """The unified Arrow schema of the source files (without metadata), if they unify."""
    try:
        schemas = [pq.read_schema(f).remove_metadata() for f in parquet_files(src)]
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError):
        return None


def _conform(table: pa.Table, schema: pa.Schema | None) -> pa.Table:
    """Give DuckDB's output the source's Arrow types back (list field names, int widths)."""
    if schema is None or table.schema.names != schema.names:
        return table
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return table


def _shards(reader: pa.RecordBatchReader, shard_rows: int) -> Iterator[pa.Table]:
    """Tables of `shard_rows` rows (the last one shorter) from a stream of batches."""
    pending: list[pa.RecordBatch] = []
    size = 0
    for batch in reader:
        pending.append(batch)
        size += batch.num_rows
        while size >= shard_rows:
            table = pa.Table.from_batches(pending, schema=reader.schema)
            yield table.slice(0, shard_rows)
            rest = table.slice(shard_rows)
            pending, size = rest.to_batches(), rest.num_rows
    if size:
        yield pa.Table.from_batches(pending, schema=reader.schema)


@locking.releasing  # the output's lock goes when the call returns, not at process exit
def filter_dataset(
    src: Path,
    out: Path,
    where: str | None = None,
    presets: Sequence[str] = (),
    params: dict[str, Any] | None = None,
    overwrite: bool = False,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    selection: Selection | None = None,
) -> FilterReport:
    """Keep the rows of `src` that pass `where` and every preset condition; write them to `out`.

    `selection` then picks among the kept rows (top-N by an expression, balanced sampling, a
    seeded shuffle; see `magpie.selection`). `out` becomes a complete dataset (shards + manifest
    with stage "filter"); a non-empty `out` is refused unless `overwrite`. Errors (bad SQL,
    missing columns) are one-line MagpieErrors.
    """
    src, out = Path(src), Path(out)
    selection = selection if selection is not None and selection.active else None
    started = time.monotonic()
    con = duckdb.connect()
    try:
        _check_out(src, out, overwrite)
        report, conditions, columns = _plan(con, src, where, presets, params, bool(selection))
        config = {
            "magpie_version": __version__,
            "command": "filter",
            "source": str(src.resolve()),
            "source_config_hash": _source_identity(src),
            "where": where,
            "presets": list(presets),
            "params": report.params,
            "conditions": [{"name": c.label, "sql": c.sql} for c in conditions],
        }
        if selection is not None:
            config["selection"] = selection.as_dict()
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        store = ShardStore(out)
        store.open_for_write("filter", config, digest.hexdigest()[:16], overwrite=overwrite)
        test = " AND ".join(_as_bool(c) for c in conditions) or "true"
        query = f"SELECT * FROM source WHERE {test}"
        if selection is not None:
            keyed = open_keyed(src, con, columns)
            query, report.selection = _selection_query(
                con, f"SELECT * FROM {keyed} WHERE {test}", selection, columns
            )
        written_rows, report.shards = _write(con, query, store, _source_schema(src), shard_rows)
        if selection is not None:
            report.selected_rows = written_rows
    finally:
        con.close()
    report.out = out
    report.seconds = time.monotonic() - started
    store.update_manifest(
        complete=True,
        rows=report.kept_rows if report.selected_rows is None else report.selected_rows,
        input_rows=report.input_rows,
        shards=report.shards,
        filter=report.as_dict(),
    )
    return report


def _write(
    con: duckdb.DuckDBPyConnection,
    query: str,
    store: ShardStore,
    schema: pa.Schema | None,
    shard_rows: int,
) -> tuple[int, int]:
    """Stream the kept rows into committed shards; return (rows, shards that hold rows)."""
    written = rows = 0
    try:
        reader = con.sql(query).to_arrow_reader(min(shard_rows, 65_536))
        for table in _shards(reader, shard_rows):
            info = {"shard": written, "rows": table.num_rows}
            store.commit(written, _conform(table, schema), info)
            written += 1
            rows += table.num_rows
    except duckdb.Error as exc:
        raise MagpieError(f"filter failed while writing: {_first_line(exc)}") from None
    if written == 0:  # nothing kept: an empty-shard marker, as other stages record one
        store.commit(0, pa.table({}), {"shard": 0, "rows": 0})
    return rows, written


# ---------------------------------------------------------------------------------------------
# output


def render_filter_report(report: FilterReport, console: Console) -> None:
    """The per-condition counts as a rich table, then the one-line summary."""
    table = Table(title=Text(f"filter {report.src}"), title_justify="left")
    table.add_column("condition")
    table.add_column("fails alone", justify="right")
    table.add_column("removed (in order)", justify="right")
    table.add_column("left", justify="right")
    table.add_column("sql", overflow="fold")
    table.add_row("input", "", "", str(report.input_rows), "")
    for c in report.conditions:
        table.add_row(
            Text(c.label), str(c.removed_alone), str(c.removed_step), str(c.left_after), Text(c.sql)
        )
    console.print(table)
    if report.skipped:
        console.print(Text(f"skipped (parameter off): {', '.join(report.skipped)}"))
    balance = report.selection.get("balance")
    if balance:
        shares = Table(title=Text(f"balanced by {balance['column']}"), title_justify="left")
        for name in ("value", "available", "taken"):
            shares.add_column(name, justify="left" if name == "value" else "right")
        for cat in balance["categories"]:
            shares.add_row(Text(str(cat["value"])), str(cat["available"]), str(cat["taken"]))
        console.print(shares)
    console.print(Text(report.summary()))
