"""What stages hand back to the runner, and the progress hook they report through."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import pyarrow as pa


class Progress(Protocol):
    """Receives progress as work completes: `units` more items done, `tokens` more generated."""

    def on_done(self, units: int, tokens: int) -> None: ...


@dataclass
class TransformOutput:
    """What a transform stage made of one slice of its input."""

    rows: pa.Table
    rejected: pa.Table | None = None
    tokens: int = 0
    rejections: dict[str, int] = field(default_factory=dict)


def dialogue(row: dict) -> tuple[list[tuple[str, str]], str]:
    """A row's earlier (user, reply) turns and the user message that its responses answer."""
    turns = row.get("conversations") or []
    if len(turns) <= 2:
        return [], row["instruction"]
    users = [m["value"] for m in turns if m["from"] == "human"]
    replies = [m["value"] for m in turns if m["from"] == "gpt"]
    return list(zip(users[:-1], replies, strict=False)), users[-1]
