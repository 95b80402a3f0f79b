"""Export formats: magpie | trl | sharegpt | openai | jsonl.

:func:`to_format` is pure (a table in, a table out); :func:`export_dataset` converts a directory
of Parquet shards into ``out_dir`` with atomic writes (temp name, fsync, ``os.replace``).

- ``magpie``: the published Magpie DPO schema, column for column (missing ones as typed nulls).
- ``trl``: ``prompt`` / ``chosen`` / ``rejected`` in TRL's conversational preference format.
- ``sharegpt``: ``conversations`` of ``{from, value}`` (plus ``chosen``/``rejected`` for DPO).
- ``openai``: ``messages`` of ``{role, content}`` (OpenAI chat fine-tuning; DPO: the chosen
  conversation).
- ``jsonl``: the input rows unchanged, written as JSON lines to ``data.jsonl``.

A non-null ``system_prompt`` column value becomes a leading system message in every chat format.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from magpie import __version__
from magpie.errors import MagpieError
from magpie.schema import CHAT_MESSAGE, MAGPIE_DPO_COLUMNS, SHAREGPT_MESSAGE
from magpie.store import fsync_dir, prepare_output_dir

FORMATS = ("magpie", "trl", "sharegpt", "openai", "jsonl")
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
    files: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the CLI."""
        return (
            f"exported {self.rows} rows from {self.source_files} shard(s) as {self.fmt} "
            f"to {self.out_dir} ({len(self.files)} file(s))"
        )


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


def _to_trl(table: pa.Table) -> pa.Table:
    if not _is_dpo(table):
        raise ExportError("trl export needs 'chosen'/'rejected' columns; run `magpie pairs` first")
    prompts, chosen, rejected = [], [], []
    for i, row in enumerate(table.to_pylist()):
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


def _to_sharegpt(table: pa.Table) -> pa.Table:
    turns = pa.list_(SHAREGPT_MESSAGE)
    rows = table.to_pylist()
    if not _is_dpo(table):
        convs = [[_sharegpt_turn(m) for m in _sft_messages(r, i)] for i, r in enumerate(rows)]
        return pa.table({"conversations": pa.array(convs, type=turns)})
    convs, chosen, rejected = [], [], []
    for i, row in enumerate(rows):
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


def _to_openai(table: pa.Table) -> pa.Table:
    dpo = _is_dpo(table)
    messages = []
    for i, row in enumerate(table.to_pylist()):
        if dpo:
            prompt, good, _ = _split_pair(row, i)
            msgs = [*prompt, good]
        else:
            msgs = _sft_messages(row, i)
        messages.append([_openai_msg(m) for m in msgs])
    return pa.table({"messages": pa.array(messages, type=pa.list_(OPENAI_MESSAGE))})


def _scores_from_rewards(rewards: pa.ChunkedArray) -> pa.Array:
    """``list<double>`` rewards as ``list<struct<score: double>>``."""
    values = [None if row is None else [{"score": s} for s in row] for row in rewards.to_pylist()]
    return pa.array(values, type=MAGPIE_DPO_COLUMNS["rewards_armorm"])


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


def _to_magpie(table: pa.Table) -> pa.Table:
    columns: dict[str, pa.ChunkedArray | pa.Array] = {}
    for name, dtype in MAGPIE_DPO_COLUMNS.items():
        if name in table.column_names:
            columns[name] = _cast_or_keep(table.column(name), dtype)
        elif name == "rewards_armorm" and "rewards" in table.column_names:
            columns[name] = _scores_from_rewards(table.column("rewards"))
        else:
            columns[name] = pa.nulls(table.num_rows, type=dtype)
    return pa.table(columns)


_CONVERTERS: dict[str, Callable[[pa.Table], pa.Table]] = {
    "magpie": _to_magpie,
    "trl": _to_trl,
    "sharegpt": _to_sharegpt,
    "openai": _to_openai,
    "jsonl": lambda table: table,
}


def to_format(table: pa.Table, fmt: str) -> pa.Table:
    """Convert ``table`` to export format ``fmt`` (one of :data:`FORMATS`)."""
    try:
        convert = _CONVERTERS[fmt]
    except KeyError:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}") from None
    return convert(table)


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
        f.flush()
        os.fsync(f.fileno())
    _commit(tmp, final)
    report.files.append(final)


def _export_parquet(files: list[Path], out: Path, fmt: str, report: ExportReport) -> None:
    """One output shard per non-empty source shard (``datasets`` cannot read empty Parquet).

    Each shard is written and fsynced under a temp name; once the count is known each is renamed
    to ``train-NNNNN-of-MMMMM.parquet``. Only when every source is empty is one empty shard kept,
    so the schema survives.
    """
    staged: list[Path] = []
    for i, path in enumerate(files):
        table = to_format(pq.read_table(path), fmt)
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


def export_dataset(
    src_dir: str | Path, out_dir: str | Path, fmt: str, overwrite: bool = False
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
            _export_parquet(files, out, fmt, report)
    finally:  # a failed export leaves no half-written temp files behind
        for tmp in out.glob(f"{_TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
    _write_manifest(report)
    return report
