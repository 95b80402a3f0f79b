"""Drives stages over stores: shard planning, resume, progress, bookkeeping.

Stages never touch files; the runner commits their output shard by shard, so killing a run loses
at most the shard in flight, and running the same command again continues from the last commit.
Two kinds of stage exist: a *source* (instruction synthesis) that makes rows until enough are
accepted, and a *transform* that maps fixed slices of an input dataset to output shards.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from magpie.errors import MagpieError
from magpie.stages.base import TransformOutput
from magpie.store import ShardStore

if TYPE_CHECKING:
    from magpie.stages.instructions import InstructionStage


@dataclass
class RunSummary:
    """Counts of one stage run (this invocation plus what earlier ones committed)."""

    stage: str
    out: str
    rows: int = 0
    input_rows: int = 0
    attempts: int = 0
    tokens: int = 0
    shards: int = 0
    resumed_shards: int = 0
    seconds: float = 0.0
    new_tokens: int = 0
    new_rows: int = 0
    rejections: Counter[str] = field(default_factory=Counter)
    complete: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "input_rows": self.input_rows,
            "attempts": self.attempts,
            "tokens": self.tokens,
            "shards": self.shards,
            "rejections": dict(sorted(self.rejections.items())),
            "complete": self.complete,
        }

    def add_shard(self, info: dict[str, Any], new: bool) -> None:
        """Account for one committed shard's bookkeeping."""
        self.shards += 1
        self.rows += info["rows"]
        self.input_rows += info.get("input_rows", 0)
        self.tokens += info.get("tokens", 0)
        self.rejections.update(info.get("rejections", {}))
        if "attempts" in info:
            self.attempts += info["attempts"][1] - info["attempts"][0]
        if new:
            self.new_rows += info["rows"]
            self.new_tokens += info.get("tokens", 0)
        else:
            self.resumed_shards += 1


class StageProgress:
    """One stage's bar in a ProgressView: completed units, live tokens/s and rows/s."""

    def __init__(self, progress: Progress, label: str, total: int, unit: str) -> None:
        self._progress = progress
        self._task = progress.add_task(label, total=total, speed="", unit=unit)
        self.started = time.monotonic()
        self.tokens = 0
        self.units = 0

    def on_done(self, units: int, tokens: int) -> None:
        """Engine callback: `units` more items finished, `tokens` more tokens generated."""
        self.units += units
        self.tokens += tokens
        self._progress.advance(self._task, units)
        self._refresh()

    def set_completed(self, completed: int) -> None:
        self._progress.update(self._task, completed=completed)
        self._refresh()

    def _refresh(self) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        speed = f"{self.units / elapsed:.2f}/s · {self.tokens / elapsed:.0f} tok/s"
        self._progress.update(self._task, speed=speed)


class ProgressView:
    """One progress display for a command or a whole pipeline; a bar per stage."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description:<13}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} {task.fields[unit]}"),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )

    def stage(self, label: str, total: int, unit: str = "rows") -> StageProgress:
        return StageProgress(self._progress, label, total, unit)

    @contextmanager
    def shown(self) -> Iterator[ProgressView]:
        with self._progress:
            yield self


def plan_attempts(start: int, need: int, shard_size: int, budget: int, rate: float) -> range:
    """Attempt numbers of the next shard: enough for `need` rows at the acceptance `rate`."""
    wanted = math.ceil(need / max(rate, 0.05) * 1.1) + 1
    return range(start, min(start + min(shard_size, wanted), budget))


def _resume(store: ShardStore, summary: RunSummary, observe: Callable[[pa.Table], None]) -> None:
    """Account for the shards earlier runs committed; they must be contiguous from 0."""
    for index in store.shard_indices():
        if index != summary.shards:
            raise MagpieError(
                f"{store.root} misses shard {summary.shards} before shard {index}: "
                "pass --overwrite to start again"
            )
        rows = store.read_shard(index)
        if rows is not None:
            observe(rows)
        summary.add_shard(store.shard_info(index), new=False)


def run_source(
    stage: InstructionStage,
    store: ShardStore,
    num: int,
    shard_size: int,
    budget: int,
    progress: StageProgress,
) -> RunSummary:
    """Fill `store` with `num` accepted rows, resuming after its committed shards."""
    summary = RunSummary(stage="instructions", out=str(store.root))
    _resume(store, summary, stage.observe)
    next_attempt = summary.attempts
    started = time.monotonic()
    progress.set_completed(summary.rows)
    while summary.rows < num and next_attempt < budget:
        rate = summary.rows / summary.attempts if summary.attempts else 1.0
        attempts = plan_attempts(next_attempt, num - summary.rows, shard_size, budget, rate)
        out = stage.run(attempts, lambda _requests, tokens: progress.on_done(0, tokens))
        rows = out.rows.slice(0, num - summary.rows)
        info = {
            "shard": summary.shards,
            "attempts": [attempts.start, attempts.stop],
            "rows": rows.num_rows,
            "surplus": out.rows.num_rows - rows.num_rows,
            "tokens": out.tokens,
            "rejections": dict(out.rejections),
        }
        store.commit(summary.shards, rows, info, rejected=out.rejected)
        summary.add_shard(info, new=True)
        next_attempt = attempts.stop
        progress.on_done(rows.num_rows, 0)
    summary.seconds = time.monotonic() - started
    summary.complete = summary.rows >= num
    store.update_manifest(**summary.as_dict())
    return summary


Transform = Callable[[pa.Table, "StageProgress"], TransformOutput]


def run_transform(
    name: str,
    transform: Transform,
    source: pa.Table,
    store: ShardStore,
    shard_size: int,
    progress: StageProgress,
) -> RunSummary:
    """Map `source` to `store` in slices of `shard_size` rows, resuming after committed shards.

    Slice k of the input always becomes shard k, so a resumed run writes what an uninterrupted
    one does. `transform` reports progress in input rows through `progress.on_done`.
    """
    summary = RunSummary(stage=name, out=str(store.root))
    _resume(store, summary, lambda _rows: None)
    started = time.monotonic()
    progress.set_completed(summary.input_rows)
    for index in range(summary.shards, math.ceil(source.num_rows / shard_size)):
        chunk = source.slice(index * shard_size, shard_size)
        out = transform(chunk, progress)
        info = {
            "shard": index,
            "input_rows": chunk.num_rows,
            "rows": out.rows.num_rows,
            "tokens": out.tokens,
            "rejections": out.rejections,
        }
        store.commit(index, out.rows, info, rejected=out.rejected)
        summary.add_shard(info, new=True)
        progress.set_completed(summary.input_rows)
    summary.seconds = time.monotonic() - started
    summary.complete = summary.input_rows == source.num_rows
    store.update_manifest(**summary.as_dict())
    return summary
