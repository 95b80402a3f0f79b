"""Export formats: magpie | trl | sharegpt | openai | jsonl.

:func:`to_format` is pure (a table in, a table out); :func:`export_dataset` converts a directory
of Parquet shards into ``out_dir`` with atomic writes (temp name, fsync, ``os.replace``).

- ``magpie``: the published Magpie layouts (``magpie.published``), names and Arrow types exact,
  missing columns as typed nulls: the Llama-3.1 Pro SFT layout for rows with one reply (or
  none), the DPO layout for pairs and multi-response rows. Only ArmoRM's scores fill
  ``rewards_armorm``; our other columns (``rewards_judge``, ``reward_margin``, ...) follow the
  published ones only with ``extra_columns``, and are named as left out otherwise.
- ``trl``: ``prompt`` / ``chosen`` / ``rejected`` in TRL's conversational preference format.
- ``sharegpt``: ``conversations`` of ``{from, value}`` (plus ``chosen``/``rejected`` for DPO).
- ``openai``: ``messages`` of ``{role, content}`` (OpenAI chat fine-tuning; DPO: the chosen
  conversation, the rejected reply is counted as left out).
- ``openai-preference``: OpenAI preference fine-tuning rows ``input: {messages}``,
  ``preferred_output`` and ``non_preferred_output`` (DPO data only; nothing of the pair is lost).
- ``jsonl``: the input rows unchanged, written as JSON lines to ``data.jsonl``.

``test_size`` moves a seeded share of the source rows to a ``test`` split beside ``train``.

Multi-response SFT rows (``responses`` with several entries) give one conversation with the
first response in ``sharegpt``/``openai``; ``all_responses=True`` writes one row per response.
Every export reports what its format keeps and counts what it left out.

A non-null ``system_prompt`` column value becomes a leading system message in every chat format.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from magpie import __version__
from magpie.errors import MagpieError
from magpie.published import MAGPIE_DPO_LAYOUT, MAGPIE_SFT_LAYOUT
from magpie.schema import CHAT_MESSAGE, REWARD_SCORE, SHAREGPT_MESSAGE
from magpie.stages.base import dialogue
from magpie.store import fsync_dir, prepare_output_dir

FORMATS = ("magpie", "trl", "sharegpt", "openai", "openai-preference", "jsonl")
KEEPS = {
    "magpie": "the published Magpie columns (SFT or DPO layout)",
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
    extra_columns: bool = False
    left_out: Counter[str] = field(default_factory=Counter)
    dropped: dict[str, None] = field(default_factory=dict)


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
    splits: Counter[str] = field(default_factory=Counter)
    test_size: float | None = None
    split_seed: int | None = None
    extra_columns: bool = False

    def summary(self) -> str:
        """One line for the CLI."""
        rows = f"{self.rows} rows" + (
            f" (from {self.input_rows} input rows)" if self.input_rows != self.rows else ""
        )
        if self.test_size is not None:
            rows += f" (train {self.splits['train']}, test {self.splits['test']})"
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
            lines.append(
                f"left out: columns {names}{more} (--extra-columns keeps them after the "
                "published ones; --format jsonl keeps every column)"
            )
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


def _project(value: Any, target: pa.DataType) -> Any:
    """A Python value reshaped to ``target``: struct fields by name (missing ones null)."""
    if value is None:
        return None
    if pa.types.is_struct(target):
        return {f.name: _project(value.get(f.name), f.type) for f in target}
    if pa.types.is_list(target) or pa.types.is_large_list(target):
        return [_project(v, target.value_type) for v in value]
    return value


def _conform(name: str, column: pa.ChunkedArray | pa.Array, target: pa.DataType) -> pa.Array:
    """``column`` as exactly ``target``: cast, or rebuilt field by field for nested types."""
    if column.type == target:
        return column
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), type=target)
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    try:
        if not pa.types.is_nested(target):
            raise TypeError
        return pa.array([_project(v, target) for v in column.to_pylist()], type=target)
    except (TypeError, AttributeError, pa.ArrowInvalid, pa.ArrowTypeError):
        raise ExportError(
            f"column '{name}' is {column.type} where the published Magpie layout has {target}: "
            "fix the column, or export with --format jsonl"
        ) from None


def _score_columns(table: pa.Table) -> list[str]:
    """The ``rewards_<scorer>`` columns the score stage wrote (judge, armorm, skywork_..)."""
    return [n for n in table.column_names if n.startswith("rewards_")]


def _is_sft(table: pa.Table) -> bool:
    """Rows with one reply (``response``/``conversations``) or none yet, and no pairs."""
    names = table.column_names
    if _is_dpo(table):
        return False
    if "response" in names or "conversations" in names or "responses" not in names:
        return True
    return all(len(r or []) <= 1 for r in table.column("responses").to_pylist())


def _sft_fill(table: pa.Table) -> dict[str, pa.Array]:
    """SFT columns derived when absent: model, response, conversations and the lengths."""
    rows = table.select(
        [
            c
            for c in (
                "instruction",
                "response",
                "responses",
                "conversations",
                "gen_input_configs",
                "gen_response_configs",
                "model",
            )
            if c in table.column_names
        ]
    ).to_pylist()
    response = [r.get("response") or _first_text(r.get("responses")) for r in rows]
    conversations = [
        r.get("conversations")
        or (
            [{"from": "human", "value": r["instruction"]}, {"from": "gpt", "value": text}]
            if r.get("instruction") and text
            else None
        )
        for r, text in zip(rows, response, strict=True)
    ]
    model = [
        r.get("model")
        or (r.get("gen_response_configs") or {}).get("output_generator")
        or (r.get("gen_input_configs") or {}).get("input_generator")
        for r in rows
    ]
    filled = {
        "model": pa.array(model, pa.string()),
        "response": pa.array(response, pa.string()),
        "conversations": pa.array(conversations, MAGPIE_SFT_LAYOUT["conversations"]),
        "response_length": pa.array([len(t) if t else None for t in response], pa.int64()),
    }
    if "instruction" in table.column_names:
        texts = table.column("instruction").to_pylist()
        filled["instruction_length"] = pa.array(
            [None if t is None else len(t) for t in texts], pa.int64()
        )
    return filled


_FOLLOW_UP = re.compile(r"^(instruction|response)_\d+$")


def _to_magpie(table: pa.Table, opts: _Options) -> pa.Table:
    """The published SFT or DPO layout (see ``magpie.published``), extra columns on request.

    SFT layout for rows with one reply or none (``response``/``conversations``), DPO layout for
    pairs and multi-response rows. Only ArmoRM's scores fill ``rewards_armorm``; a plain
    ``rewards`` list with no named column beside it (older data) is taken as ArmoRM's, as the
    published data has it. Flat follow-up columns of extended conversations (``instruction_2``,
    ``response_2``, ...) stay after ``conversations``, as in the published multi-turn sets.
    """
    sft = _is_sft(table)
    layout = MAGPIE_SFT_LAYOUT if sft else MAGPIE_DPO_LAYOUT
    derived: dict[str, pa.Array] = {}
    if sft:
        derived = _sft_fill(table)
    else:
        if "instruction" in table.column_names:
            texts = table.column("instruction").to_pylist()
            derived["input_length"] = pa.array(
                [None if t is None else len(t) for t in texts], pa.int64()
            )
        if "rewards" in table.column_names and not _score_columns(table):
            derived["rewards_armorm"] = _scores_from_rewards(table.column("rewards"))
    columns: dict[str, Any] = {}
    for name, dtype in layout.items():  # derived values already take the row's own first
        if name in derived:
            columns[name] = _conform(name, derived[name], dtype)
        elif name in table.column_names:
            columns[name] = _conform(name, table.column(name), dtype)
        else:
            columns[name] = pa.nulls(table.num_rows, type=dtype)
        if sft and name == "conversations":
            for extra in table.column_names:
                if _FOLLOW_UP.match(extra) and extra not in ("instruction_1", "response_1"):
                    columns[extra] = table.column(extra)
    extras = [c for c in table.column_names if c not in columns]
    if opts.extra_columns:
        for name in extras:
            columns[name] = table.column(name)
    else:  # `rewards` and `instruction_length` live on as rewards_armorm / input_length
        quiet = {"rewards", "instruction_length"}
        opts.dropped.update(dict.fromkeys(c for c in extras if c not in quiet))
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
    extra_columns: bool = False,
    left_out: Counter[str] | None = None,
    dropped: dict[str, None] | None = None,
) -> pa.Table:
    """Convert ``table`` to export format ``fmt`` (one of :data:`FORMATS`).

    ``all_responses``: one row per response for multi-response SFT rows. ``extra_columns``
    (``magpie`` only): keep our columns beyond the published layout after it. What the
    conversion leaves out is added to ``left_out`` (what -> count) and the names of columns
    the ``magpie`` format left out to ``dropped``, when given.
    """
    try:
        convert = _CONVERTERS[fmt]
    except KeyError:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}") from None
    opts = _Options(all_responses=all_responses, extra_columns=extra_columns)
    out = convert(table, opts)
    if left_out is not None:
        left_out.update(opts.left_out)
    if dropped is not None:
        dropped.update(opts.dropped)
    return out


# ----------------------------------------------------------------------------- splits


def pick_test_rows(total: int, test_size: float | None, seed: int) -> frozenset[int]:
    """Row numbers (over the whole source, in shard order) that go to the ``test`` split.

    ``ceil(total * test_size)`` rows (at most all but one) drawn without replacement by a
    generator seeded with ``seed``: the same source, size and seed always give the same split.
    """
    if test_size is None:
        return frozenset()
    if not 0.0 < test_size < 1.0:
        raise ExportError(
            f"--test-size {test_size} is not a fraction between 0 and 1: use e.g. 0.02 (2%)"
        )
    count = min(math.ceil(total * test_size), max(total - 1, 0))  # train keeps a row
    import numpy as np

    picked = np.random.default_rng(seed).choice(total, size=count, replace=False)
    return frozenset(int(i) for i in picked)


def _split(table: pa.Table, start: int, test: frozenset[int]) -> dict[str, pa.Table]:
    """``table`` (rows ``start...``) cut into its train and test rows, order kept."""
    if not test:
        return {"train": table}
    flags = [start + i in test for i in range(table.num_rows)]
    mask = pa.array(flags, pa.bool_())
    return {"train": table.filter(pc.invert(mask)), "test": table.filter(mask)}


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
        "splits": dict(report.splits),
        "test_size": report.test_size,
        "split_seed": report.split_seed,
        "extra_columns": report.extra_columns,
        "left_out": dict(report.left_out),
        "files": [p.name for p in report.files],
        "written_files": [p.name for p in report.files],  # what --overwrite may remove
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


def _export_jsonl(files: list[Path], out: Path, report: ExportReport, test: frozenset[int]) -> None:
    """One ``data.jsonl``; with a test split ``train.jsonl`` and ``test.jsonl``."""
    names = {"train": "train.jsonl", "test": "test.jsonl"} if test else {"train": JSONL_NAME}
    with contextlib.ExitStack() as stack:
        handles = {
            split: stack.enter_context(open(out / f"{_TMP_PREFIX}{name}", "w", encoding="utf-8"))
            for split, name in names.items()
        }
        start = 0
        for path in files:
            source = pq.read_table(path)
            for split, part in _split(source, start, test).items():
                handles[split].writelines(_json_lines(part))
                report.rows += part.num_rows
                report.splits[split] += part.num_rows
            start += source.num_rows
            report.input_rows += source.num_rows
        for handle in handles.values():
            handle.flush()
            os.fsync(handle.fileno())
    for name in names.values():
        _commit(out / f"{_TMP_PREFIX}{name}", out / name)
        report.files.append(out / name)


def _export_parquet(
    files: list[Path],
    out: Path,
    report: ExportReport,
    test: frozenset[int],
    options: dict[str, bool],
) -> None:
    """One output shard per split and non-empty source shard (``datasets`` cannot read empty
    Parquet).

    Each shard is written and fsynced under a temp name; once the counts are known each is
    renamed to ``SPLIT-NNNNN-of-MMMMM.parquet`` (the names ``datasets`` reads as splits). Only
    when every source is empty is one empty train shard kept, so the schema survives.
    """
    staged: dict[str, list[Path]] = {"train": [], "test": []}
    dropped: dict[str, None] = {}
    start = 0
    for i, path in enumerate(files):
        source = pq.read_table(path)
        report.input_rows += source.num_rows
        for split, part in _split(source, start, test).items():
            table = to_format(
                part, report.fmt, left_out=report.left_out, dropped=dropped, **options
            )
            last = i == len(files) - 1 and split == "train"
            if table.num_rows == 0 and (staged[split] or not last):
                continue
            tmp = out / f"{_TMP_PREFIX}{split}-{len(staged[split]):05d}.parquet"
            _write_fsynced(table, tmp)
            staged[split].append(tmp)
            report.rows += table.num_rows
            report.splits[split] += table.num_rows
        start += source.num_rows
    for split, temps in staged.items():
        for i, tmp in enumerate(temps):
            target = out / f"{split}-{i:05d}-of-{len(temps):05d}.parquet"
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
    *,
    test_size: float | None = None,
    split_seed: int = 0,
    extra_columns: bool = False,
) -> ExportReport:
    """Convert every ``*.parquet`` shard of ``src_dir`` (by name) to ``fmt`` in ``out_dir``.

    Parquet formats write one ``train-NNNNN-of-MMMMM.parquet`` per non-empty source shard;
    ``jsonl`` writes one ``data.jsonl``. ``test_size`` (a fraction, e.g. 0.02) moves that share
    of the source rows, drawn with ``split_seed``, to a ``test`` split beside ``train``
    (``test-*.parquet``, or ``train.jsonl`` + ``test.jsonl``): ``datasets.load_dataset(out_dir)``
    reads both. ``extra_columns`` keeps our columns beyond the published Magpie layout. Every
    file is committed atomically. A non-empty ``out_dir`` is refused unless ``overwrite``, which
    first removes the files magpie wrote there (other files, e.g. a dataset card, stay).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src, out = Path(src_dir), Path(out_dir)
    files = _source_files(src)
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    test = pick_test_rows(total, test_size, split_seed)
    _prepare_out_dir(src, out, overwrite)
    report = ExportReport(
        fmt=fmt,
        src_dir=src,
        out_dir=out,
        source_files=len(files),
        test_size=test_size,
        split_seed=split_seed if test_size is not None else None,
        extra_columns=extra_columns,
    )
    try:
        if fmt == "jsonl":
            _export_jsonl(files, out, report, test)
        else:
            options = {"all_responses": all_responses, "extra_columns": extra_columns}
            _export_parquet(files, out, report, test, options)
    finally:  # a failed export leaves no half-written temp files behind
        for tmp in out.glob(f"{_TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
    _write_manifest(report)
    return report
