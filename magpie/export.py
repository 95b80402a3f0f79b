"""Export formats: magpie | trl | sharegpt | openai | jsonl.

:func:`to_format` is pure (a table in, a table out); :func:`export_dataset` converts a directory
of Parquet shards into ``out_dir`` with atomic writes (temp name, fsync, ``os.replace``).

- ``magpie``: the published Magpie DPO schema, column for column (missing ones as typed nulls);
  scores go to ``rewards_<scorer>`` (``rewards_armorm`` for ArmoRM, ``rewards_judge`` for the
  LLM judge, any other reward model under its own short name after the schema's columns).
- ``trl``: ``prompt`` / ``chosen`` / ``rejected`` in TRL's conversational preference format.
- ``sharegpt``: ``conversations`` of ``{from, value}`` (plus ``chosen``/``rejected`` for DPO).
- ``openai``: ``messages`` of ``{role, content}`` (OpenAI chat fine-tuning; DPO: the chosen
  conversation, the rejected reply is counted as left out).
- ``openai-preference``: OpenAI preference fine-tuning rows ``input: {messages}``,
  ``preferred_output`` and ``non_preferred_output`` (DPO data only; nothing of the pair is lost).
- ``jsonl``: the input rows unchanged, written as JSON lines to ``data.jsonl``.

Multi-response SFT rows (``responses`` with several entries) give one conversation with the
first response in ``sharegpt``/``openai``; ``all_responses=True`` writes one row per response.
Every export reports what its format keeps and counts what it left out.

A non-null ``system_prompt`` column value becomes a leading system message in every chat format.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from magpie import __version__
from magpie.errors import MagpieError
from magpie.schema import CHAT_MESSAGE, MAGPIE_DPO_COLUMNS, REWARD_SCORE, SHAREGPT_MESSAGE
from magpie.stages.base import dialogue
from magpie.store import fsync_dir, prepare_output_dir

FORMATS = ("magpie", "trl", "sharegpt", "openai", "openai-preference", "jsonl")
KEEPS = {
    "magpie": "the published Magpie DPO columns",
    "trl": "prompt, chosen and rejected conversations",
    "sharegpt": "the conversation (DPO: the prompt turns plus chosen and rejected)",
    "openai": "one chat conversation per row (DPO: the chosen one)",
    "openai-preference": "input messages, preferred and non-preferred output",
    "jsonl": "every column of every row",
}
JSONL_NAME = "data.jsonl"
MANIFEST_PATH = Path(".magpie") / "export.json"  # hidden: `datasets` skips dot-directories
_TMP_PREFIX = ".tmp-"

# CHAT_MESSAGE field order follows the published Magpie DPO data (content, role); OpenAI's
# chat format is written role first.
MESSAGES = pa.list_(CHAT_MESSAGE)
OPENAI_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


_TO_SHAREGPT = {"user": "human", "assistant": "gpt", "system": "system"}
_TO_OPENAI = {v: k for k, v in _TO_SHAREGPT.items()}

Message = dict[str, str]

MORE_RESPONSES = "responses beyond the first (--all-responses writes one row per response)"
REJECTED_REPLIES = "rejected replies (--format openai-preference keeps each pair)"
UNPAIRED = "responses neither chosen nor rejected (--format jsonl keeps them)"


@dataclass
class _Options:
    """Per-export choices and the tally of what was left out."""

    all_responses: bool = False
    left_out: Counter[str] = field(default_factory=Counter)


class ExportError(MagpieError):
    """A table or directory that cannot be exported as asked (one-line message)."""


@dataclass
class ExportReport:
    """What :func:`export_dataset` wrote."""

    fmt: str
    src_dir: Path
    out_dir: Path
    source_files: int = 0
    rows: int = 0
    input_rows: int = 0
    files: list[Path] = field(default_factory=list)
    left_out: Counter[str] = field(default_factory=Counter)
    dropped_columns: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the CLI."""
        rows = f"{self.rows} rows" + (
            f" (from {self.input_rows} input rows)" if self.input_rows != self.rows else ""
        )
        return (
            f"exported {rows} from {self.source_files} shard(s) as {self.fmt} "
            f"to {self.out_dir} ({len(self.files)} file(s))"
        )

    def notes(self) -> list[str]:
        """What the format keeps and what it left out, one line each."""
        lines = [f"{self.fmt} keeps {KEEPS[self.fmt]}"]
        for what, count in sorted(self.left_out.items()):
            lines.append(f"left out: {count} {what}")
        if self.dropped_columns:
            names = ", ".join(self.dropped_columns[:8])
            more = (
                f" and {len(self.dropped_columns) - 8} more"
                if len(self.dropped_columns) > 8
                else ""
            )
            lines.append(f"left out: columns {names}{more} (--format jsonl keeps every column)")
        return lines


# ----------------------------------------------------------------------------- row helpers


def _row_id(row: dict[str, Any], i: int) -> str:
    return f"uuid={row['uuid']}" if row.get("uuid") else f"row {i}"


def _system(row: dict[str, Any]) -> list[Message]:
    text = row.get("system_prompt")
    return [{"role": "system", "content": text}] if text else []


def _norm(msg: dict[str, Any]) -> Message:
    """A message as ``{role, content}`` whether it came as role/content or from/value."""
    if "role" in msg:
        return {"role": msg["role"], "content": msg.get("content") or ""}
    role = _TO_OPENAI.get(msg.get("from") or "", msg.get("from") or "")
    return {"role": role, "content": msg.get("value") or ""}


def _with_system(row: dict[str, Any], messages: list[Message]) -> list[Message]:
    if messages and messages[0]["role"] == "system":
        return messages
    return _system(row) + messages


def _split_pair(row: dict[str, Any], i: int) -> tuple[list[Message], Message, Message]:
    """(prompt messages incl. system, chosen reply, rejected reply) for a DPO row."""
    replies = []
    prompt: list[Message] = []
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if isinstance(value, str):  # plain-text reply; the prompt is the instruction
            msgs = [{"role": "user", "content": row.get("instruction") or ""}]
            msgs.append({"role": "assistant", "content": value})
        elif value:
            msgs = [_norm(m) for m in value]
        else:
            raise ExportError(f"{_row_id(row, i)}: empty '{key}'; run `magpie pairs` first")
        if msgs[-1]["role"] != "assistant":
            raise ExportError(f"{_row_id(row, i)}: '{key}' does not end with an assistant turn")
        replies.append(msgs[-1])
        prompt = prompt or msgs[:-1]
    return _with_system(row, prompt), replies[0], replies[1]


def _first_text(values: Iterable[str | None] | None) -> str | None:
    return next((v for v in values or [] if v and v.strip()), None)


def _sft_messages(row: dict[str, Any], i: int) -> list[Message]:
    """One conversation for an SFT row: ``conversations``, or instruction + response(s)."""
    if row.get("conversations"):
        return _with_system(row, [_norm(m) for m in row["conversations"]])
    response = row.get("response") or _first_text(row.get("responses"))
    if not row.get("instruction") or not response:
        raise ExportError(
            f"{_row_id(row, i)}: no conversation (needs 'conversations', or 'instruction' and "
            "a non-empty 'response'/'responses'); run `magpie responses` or filter it out"
        )
    user = {"role": "user", "content": row["instruction"]}
    return _system(row) + [user, {"role": "assistant", "content": response}]


def _sft_rows(row: dict[str, Any], i: int, opts: _Options) -> list[list[Message]]:
    """The conversations an SFT row exports: its first response, or each with all_responses."""
    responses = [r for r in row.get("responses") or [] if r and r.strip()]
    if len(responses) <= 1 or not row.get("instruction"):
        return [_sft_messages(row, i)]
    if not opts.all_responses:
        opts.left_out[MORE_RESPONSES] += len(responses) - 1
        responses = responses[:1]
    history, user = dialogue(row)
    earlier = [
        message
        for u, r in history
        for message in ({"role": "user", "content": u}, {"role": "assistant", "content": r})
    ]
    return [
        _system(row)
        + earlier
        + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": response},
        ]
        for response in responses
    ]


def _count_unpaired(row: dict[str, Any], opts: _Options) -> None:
    extra = len([r for r in row.get("responses") or [] if r is not None]) - 2
    if extra > 0:
        opts.left_out[UNPAIRED] += extra


def _is_dpo(table: pa.Table) -> bool:
    names = table.column_names
    if "chosen" not in names or "rejected" not in names:
        return False
    chosen = table.column("chosen")
    return table.num_rows == 0 or chosen.null_count < table.num_rows


def _sharegpt_turn(msg: Message) -> dict[str, str]:
    return {"from": _TO_SHAREGPT.get(msg["role"], msg["role"]), "value": msg["content"]}


def _openai_msg(msg: Message) -> dict[str, str]:
    return {"role": msg["role"], "content": msg["content"]}


def _content_role(msg: Message) -> dict[str, str]:
    return {"content": msg["content"], "role": msg["role"]}


# ----------------------------------------------------------------------------- converters


def _to_trl(table: pa.Table, opts: _Options) -> pa.Table:
    if not _is_dpo(table):
        raise ExportError("trl export needs 'chosen'/'rejected' columns; run `magpie pairs` first")
    prompts, chosen, rejected = [], [], []
    for i, row in enumerate(table.to_pylist()):
        _count_unpaired(row, opts)
        prompt, good, bad = _split_pair(row, i)
        prompts.append([_content_role(m) for m in prompt])
        chosen.append([_content_role(good)])
        rejected.append([_content_role(bad)])
    return pa.table(
        {
            "prompt": pa.array(prompts, type=MESSAGES),
            "chosen": pa.array(chosen, type=MESSAGES),
            "rejected": pa.array(rejected, type=MESSAGES),
        }
    )


def _to_sharegpt(table: pa.Table, opts: _Options) -> pa.Table:
    turns = pa.list_(SHAREGPT_MESSAGE)
    rows = table.to_pylist()
    if not _is_dpo(table):
        convs = [
            [_sharegpt_turn(m) for m in conv]
            for i, r in enumerate(rows)
            for conv in _sft_rows(r, i, opts)
        ]
        return pa.table({"conversations": pa.array(convs, type=turns)})
    convs, chosen, rejected = [], [], []
    for i, row in enumerate(rows):
        _count_unpaired(row, opts)
        prompt, good, bad = _split_pair(row, i)
        convs.append([_sharegpt_turn(m) for m in prompt])
        chosen.append(_sharegpt_turn(good))
        rejected.append(_sharegpt_turn(bad))
    return pa.table(
        {
            "conversations": pa.array(convs, type=turns),
            "chosen": pa.array(chosen, type=SHAREGPT_MESSAGE),
            "rejected": pa.array(rejected, type=SHAREGPT_MESSAGE),
        }
    )


def _to_openai(table: pa.Table, opts: _Options) -> pa.Table:
    dpo = _is_dpo(table)
    messages = []
    for i, row in enumerate(table.to_pylist()):
        if dpo:
            _count_unpaired(row, opts)
            prompt, good, _ = _split_pair(row, i)
            opts.left_out[REJECTED_REPLIES] += 1
            messages.append([_openai_msg(m) for m in [*prompt, good]])
        else:
            messages.extend([_openai_msg(m) for m in conv] for conv in _sft_rows(row, i, opts))
    return pa.table({"messages": pa.array(messages, type=pa.list_(OPENAI_MESSAGE))})


def _to_openai_preference(table: pa.Table, opts: _Options) -> pa.Table:
    """OpenAI preference fine-tuning: input messages, preferred and non-preferred output."""
    if not _is_dpo(table):
        raise ExportError(
            "openai-preference export needs 'chosen'/'rejected' columns; run `magpie pairs` "
            "first (or use --format openai for SFT data)"
        )
    inputs, preferred, other = [], [], []
    for i, row in enumerate(table.to_pylist()):
        _count_unpaired(row, opts)
        prompt, good, bad = _split_pair(row, i)
        inputs.append({"messages": [_openai_msg(m) for m in prompt]})
        preferred.append([_openai_msg(good)])
        other.append([_openai_msg(bad)])
    messages = pa.list_(OPENAI_MESSAGE)
    return pa.table(
        {
            "input": pa.array(inputs, type=pa.struct([("messages", messages)])),
            "preferred_output": pa.array(preferred, type=messages),
            "non_preferred_output": pa.array(other, type=messages),
        }
    )


def _scores_from_rewards(rewards: pa.ChunkedArray) -> pa.Array:
    """``list<double>`` rewards as ``list<struct<score: double>>``."""
    values = [None if row is None else [{"score": s} for s in row] for row in rewards.to_pylist()]
    return pa.array(values, type=pa.list_(REWARD_SCORE))


def _cast_or_keep(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray:
    """Cast all-null and flat columns to the schema type; keep nested ones (no field is lost)."""
    if column.type == target:
        return column
    if pa.types.is_nested(column.type) and not pa.types.is_null(column.type):
        return column
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return column


def _score_columns(table: pa.Table) -> list[str]:
    """The ``rewards_<scorer>`` columns the score stage wrote (judge, armorm, skywork_..)."""
    return [n for n in table.column_names if n.startswith("rewards_")]


def _to_magpie(table: pa.Table, opts: _Options) -> pa.Table:
    """The published schema; each scorer's scores stay under its own ``rewards_<name>`` column.

    Only ArmoRM's scores fill ``rewards_armorm``; a plain ``rewards`` list with no named column
    beside it (older data) is taken as ArmoRM's, as the published data has it.
    """
    columns: dict[str, pa.ChunkedArray | pa.Array] = {}
    named = _score_columns(table)
    for name, dtype in MAGPIE_DPO_COLUMNS.items():
        if name in table.column_names:
            columns[name] = _cast_or_keep(table.column(name), dtype)
        elif name == "rewards_armorm" and "rewards" in table.column_names and not named:
            columns[name] = _scores_from_rewards(table.column("rewards"))
        else:
            columns[name] = pa.nulls(table.num_rows, type=dtype)
    for name in named:
        if name not in columns:
            columns[name] = table.column(name)
    return pa.table(columns)


_CONVERTERS: dict[str, Callable[[pa.Table, _Options], pa.Table]] = {
    "magpie": _to_magpie,
    "trl": _to_trl,
    "sharegpt": _to_sharegpt,
    "openai": _to_openai,
    "openai-preference": _to_openai_preference,
    "jsonl": lambda table, _opts: table,
}


def to_format(
    table: pa.Table,
    fmt: str,
    *,
    all_responses: bool = False,
    left_out: Counter[str] | None = None,
) -> pa.Table:
    """Convert ``table`` to export format ``fmt`` (one of :data:`FORMATS`).

    ``all_responses``: one row per response for multi-response SFT rows. What the conversion
    leaves out is added to ``left_out`` (what -> count) when given.
    """
    try:
        convert = _CONVERTERS[fmt]
    except KeyError:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}") from None
    opts = _Options(all_responses=all_responses)
    out = convert(table, opts)
    if left_out is not None:
        left_out.update(opts.left_out)
    return out


# ----------------------------------------------------------------------------- files


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf with None (JSON has no such numbers), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)  # dates, decimals, ...


def _json_lines(table: pa.Table) -> Iterable[str]:
    for batch in table.to_batches(max_chunksize=1024):
        for row in batch.to_pylist():
            yield json.dumps(_json_safe(row), ensure_ascii=False, default=_json_default) + "\n"


def _commit(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    fsync_dir(final.parent)


def _write_fsynced(table: pa.Table, path: Path) -> None:
    with open(path, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())


def _write_manifest(report: ExportReport) -> None:
    """Record format, source, counts and package version in ``out_dir/.magpie/export.json``."""
    path = report.out_dir / MANIFEST_PATH
    path.parent.mkdir(exist_ok=True)
    manifest = {
        "format": report.fmt,
        "source": str(report.src_dir.resolve()),
        "source_files": report.source_files,
        "rows": report.rows,
        "input_rows": report.input_rows,
        "left_out": dict(report.left_out),
        "files": [p.name for p in report.files],
        "package_version": __version__,
    }
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    _commit(tmp, path)


def _source_files(src: Path) -> list[Path]:
    if not src.is_dir():
        raise ExportError(f"source {src} is not a directory")
    files = sorted(p for p in src.glob("*.parquet") if not p.name.startswith((".", "_")))
    if not files:
        raise ExportError(f"source {src} holds no *.parquet shards")
    return files


def _prepare_out_dir(src: Path, out: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve():
        raise ExportError(f"output directory {out} is the source directory; pick another")
    prepare_output_dir(out, overwrite)  # only magpie's own files are ever removed


def _export_jsonl(files: list[Path], out: Path, report: ExportReport) -> None:
    final = out / JSONL_NAME
    tmp = out / f"{_TMP_PREFIX}{JSONL_NAME}"
    with open(tmp, "w", encoding="utf-8") as f:
        for path in files:
            table = to_format(pq.read_table(path), "jsonl")
            f.writelines(_json_lines(table))
            report.rows += table.num_rows
            report.input_rows += table.num_rows
        f.flush()
        os.fsync(f.fileno())
    _commit(tmp, final)
    report.files.append(final)


def _export_parquet(
    files: list[Path], out: Path, fmt: str, report: ExportReport, all_responses: bool = False
) -> None:
    """One output shard per non-empty source shard (``datasets`` cannot read empty Parquet).

    Each shard is written and fsynced under a temp name; once the count is known each is renamed
    to ``train-NNNNN-of-MMMMM.parquet``. Only when every source is empty is one empty shard kept,
    so the schema survives.
    """
    staged: list[Path] = []
    dropped: dict[str, None] = {}
    for i, path in enumerate(files):
        source = pq.read_table(path)
        report.input_rows += source.num_rows
        table = to_format(source, fmt, all_responses=all_responses, left_out=report.left_out)
        if fmt == "magpie":
            dropped.update(
                dict.fromkeys(
                    c for c in source.column_names if c not in table.schema.names and c != "rewards"
                )
            )
        if table.num_rows == 0 and (staged or i < len(files) - 1):
            continue
        tmp = out / f"{_TMP_PREFIX}{len(staged):05d}.parquet"
        _write_fsynced(table, tmp)
        staged.append(tmp)
        report.rows += table.num_rows
    for i, tmp in enumerate(staged):
        target = out / f"train-{i:05d}-of-{len(staged):05d}.parquet"
        os.replace(tmp, target)
        report.files.append(target)
    fsync_dir(out)
    report.dropped_columns = list(dropped)


def export_dataset(
    src_dir: str | Path,
    out_dir: str | Path,
    fmt: str,
    overwrite: bool = False,
    all_responses: bool = False,
) -> ExportReport:
    """Convert every ``*.parquet`` shard of ``src_dir`` (by name) to ``fmt`` in ``out_dir``.

    Parquet formats write one ``train-NNNNN-of-MMMMM.parquet`` per non-empty source shard;
    ``jsonl`` writes one ``data.jsonl``. Every file is committed atomically. A non-empty
    ``out_dir`` is refused unless ``overwrite``, which first removes its ``*.parquet`` and
    ``*.jsonl`` files (other files, e.g. a dataset card, stay).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src, out = Path(src_dir), Path(out_dir)
    files = _source_files(src)
    _prepare_out_dir(src, out, overwrite)
    report = ExportReport(fmt=fmt, src_dir=src, out_dir=out, source_files=len(files))
    try:
        if fmt == "jsonl":
            _export_jsonl(files, out, report)
        else:
            _export_parquet(files, out, fmt, report, all_responses)
    finally:  # a failed export leaves no half-written temp files behind
        for tmp in out.glob(f"{_TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
    _write_manifest(report)
    return report
