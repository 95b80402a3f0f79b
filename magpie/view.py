"""`magpie view`: one self-contained HTML file to browse a dataset's rows offline.

The rows are embedded in the page as column-wise JSON, split into blocks of `CHUNK_ROWS` rows
(`<script type="application/json">`, never executed). The page parses the first block, shows the
first page of rows, then parses the rest in the background, so the first rows appear quickly
whatever the size and no single string grows past the browser's limits. No sidecar file: a page
opened from disk (file://) may not fetch files beside it, and a JSON file in a dataset directory
would upset `datasets`' file discovery.

Text is text: every `<` in the JSON is written as `\\u003c`, so data cannot end its block, and the
page sets all model text through `textContent` (Markdown rendering builds DOM nodes), under a
Content-Security-Policy that allows only the page's own script (by hash) and no network.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from magpie.card import VIEW_NAME
from magpie.store import atomic_write_bytes
from magpie.view_page import PAGE_TEMPLATE, SCRIPT, STYLE

DEFAULT_NAME = VIEW_NAME
CHUNK_ROWS = 2000
# Categorical columns offered as filters and shown as badges (when the dataset has them).
TAG_COLUMNS = (
    "task_category",
    "difficulty",
    "input_quality",
    "language",
    "safety",
    "llama_guard_2",
)
NUMBER_COLUMNS = ("chosen_reward", "rejected_reward", "reward_margin", "instruct_reward")


@dataclass
class ViewReport:
    """What `write_view` wrote."""

    path: Path
    rows: int
    kind: str
    bytes: int
    seconds: float

    def summary(self) -> str:
        size = self.bytes / 1e6
        return f"view {self.path} ({self.rows} {self.kind} rows, {size:.1f} MB)"


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _messages(value: Any) -> list[list[str]]:
    """[[role, text], ...] from chat messages ({role, content}) or ShareGPT ({from, value})."""
    out: list[list[str]] = []
    for msg in value or []:
        if not isinstance(msg, dict):
            continue
        role = msg.get("role") or msg.get("from") or ""
        text = msg.get("content") if "content" in msg else msg.get("value")
        out.append([str(role), "" if text is None else str(text)])
    return out


def _has_context(table: pa.Table) -> bool:
    """Whether some `chosen` holds more than [user, assistant] (a multi-turn pair)."""
    chosen = table.column("chosen")
    if not pa.types.is_list(chosen.type):
        return False
    return (pc.max(pc.list_value_length(chosen)).as_py() or 0) > 2


def _last_contents(column: pa.ChunkedArray) -> list[str | None]:
    """The text of the last message of each row's message list (None for empty or null)."""
    if not pa.types.is_list(column.type):  # chosen/rejected as plain text
        return [_text(v) for v in column.to_pylist()]
    array = column.combine_chunks()
    if not pa.types.is_struct(array.type.value_type) or (
        array.type.value_type.get_field_index("content") < 0
    ):
        return [m[-1][1] if m else None for m in (_messages(v) for v in array.to_pylist())]
    lengths = pc.fill_null(pc.list_value_length(array), 0)
    last = pc.subtract(array.offsets[1:], 1)
    last = pc.if_else(pc.greater(lengths, 0), last, pa.scalar(None, last.type))
    return pc.take(array.values.field("content"), last).to_pylist()


def view_kind(columns: list[str]) -> str:
    """What a row shows: dpo pair, sft reply, multi-turn conversation, or sampled responses."""
    if {"chosen", "rejected"} <= set(columns):
        return "dpo"
    if "conversations" in columns and "response" not in columns:
        return "multi"
    if "response" in columns or "conversations" in columns:
        return "sft"
    if "responses" in columns:
        return "responses"
    return "instructions"


def _round(value: Any) -> float | None:
    if value is None or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return round(float(value), 4)


def _chunk(
    table: pa.Table, kind: str, dictionaries: dict[str, dict[str, int]], context: bool
) -> dict[str, Any]:
    """One block of rows as columns (the same columns in every block)."""
    cols = table.column_names
    data: dict[str, Any] = {
        "uuid": table.column("uuid").to_pylist() if "uuid" in cols else None,
        "instruction": [_text(v) for v in table.column("instruction").to_pylist()],
    }
    if kind == "dpo":
        for side in ("chosen", "rejected"):
            data[side] = _last_contents(table.column(side))
        if context:  # turns between the first instruction and the final replies
            messages = [_messages(v) for v in table.column("chosen").to_pylist()]
            data["context"] = [m[1:-1] if len(m) > 2 else None for m in messages]
    elif kind == "sft" and "response" in cols:
        data["response"] = [_text(v) for v in table.column("response").to_pylist()]
    elif kind in ("sft", "multi"):
        data["conversation"] = [_messages(v) for v in table.column("conversations").to_pylist()]
    if kind == "responses":
        data["responses"] = [
            [str(r) for r in v or []] for v in table.column("responses").to_pylist()
        ]
        if "rewards" in cols:
            data["rewards"] = [
                [_round(x) for x in v or []] for v in table.column("rewards").to_pylist()
            ]
    for name in NUMBER_COLUMNS:
        if name in cols:
            data[name] = [_round(v) for v in table.column(name).to_pylist()]
    for name, codes in dictionaries.items():
        values = table.column(name).to_pylist()
        data[f"tag:{name}"] = [
            -1 if v is None else codes.setdefault(str(v), len(codes)) for v in values
        ]
    return data


def _json_block(value: Any, block_id: str) -> str:
    """A JSON data block that no string inside it can close or turn into markup."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f'<script type="application/json" class="magpie-data" id="{block_id}">{text}</script>\n'


def render_html(table: pa.Table, title: str) -> str:
    """The whole page for `table`."""
    kind = view_kind(table.column_names)
    tags = [c for c in TAG_COLUMNS if c in table.column_names]
    dictionaries: dict[str, dict[str, int]] = {c: {} for c in tags}
    context = kind == "dpo" and _has_context(table)
    blocks = []
    for i, start in enumerate(range(0, table.num_rows, CHUNK_ROWS)):
        chunk = _chunk(table.slice(start, CHUNK_ROWS), kind, dictionaries, context)
        blocks.append(_json_block(chunk, f"magpie-rows-{i}"))
    header = {
        "title": title,
        "kind": kind,
        "rows": table.num_rows,
        "blocks": len(blocks),
        "tags": {name: list(codes) for name, codes in dictionaries.items()},
        "numbers": [c for c in NUMBER_COLUMNS if c in table.column_names],
    }
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    return PAGE_TEMPLATE.format(
        title=html.escape(title),
        csp=f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{digest}'",
        style=STYLE,
        header=_json_block(header, "magpie-header"),
        blocks="".join(blocks),
        script=SCRIPT,
    )


def write_view(table: pa.Table, out: Path, title: str) -> ViewReport:
    """Write the viewer of `table` to `out` atomically."""
    started = time.monotonic()
    page = render_html(table, title).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, page)
    kind = view_kind(table.column_names)
    return ViewReport(out, table.num_rows, kind, len(page), time.monotonic() - started)
