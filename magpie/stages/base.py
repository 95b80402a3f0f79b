"""The Stage protocol, what stages hand back to executors, and the progress hook they report to.

A stage is pure: a slice of rows in, a `TransformOutput` out, no file I/O. Stages are built where
they run (in this process or inside a Ray actor) from a picklable `StageSpec`, so no live engine
ever travels between processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

if TYPE_CHECKING:
    from magpie.engines.base import EnginePool


class Progress(Protocol):
    """Receives progress as work completes: `units` more items done, `tokens` more generated."""

    def on_done(self, units: int, tokens: int) -> None: ...


class NullProgress:
    """Progress that goes nowhere (inside Ray actors the driver shows the bar)."""

    def on_done(self, units: int, tokens: int) -> None:
        return None


@dataclass
class TransformOutput:
    """What a stage made of one slice of its input."""

    rows: pa.Table
    rejected: pa.Table | None = None
    tokens: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    attempts_run: int | None = None
    """Instruction blocks: attempts generated, when a block stopped early (else all of it)."""


class Stage(Protocol):
    """A pure function from a slice of rows to rows with more columns."""

    name: str
    required_columns: tuple[str, ...]
    """Input columns the stage reads; the executor refuses an input that lacks one."""

    def __call__(self, rows: pa.Table, progress: Progress) -> TransformOutput: ...


BuildStage = Callable[[Any, "EnginePool"], tuple[Stage, dict[str, Any]]]


@dataclass(frozen=True)
class StageSpec:
    """A picklable recipe of a stage: `build(config, engines)` runs where the stage runs.

    `build` must be a module-level function (pickled by reference) returning the stage and its
    identity (model ids, chat format: what the output's manifest records about who made it).
    """

    name: str
    build: BuildStage
    config: Any

    def __call__(self, engines: EnginePool) -> tuple[Stage, dict[str, Any]]:
        return self.build(self.config, engines)


def dialogue(row: dict) -> tuple[list[tuple[str, str]], str]:
    """A row's earlier (user, reply) turns and the user message that its responses answer."""
    turns = row.get("conversations") or []
    if len(turns) <= 2:
        return [], row["instruction"]
    users = [m["value"] for m in turns if m["from"] == "human"]
    replies = [m["value"] for m in turns if m["from"] == "gpt"]
    return list(zip(users[:-1], replies, strict=False)), users[-1]
