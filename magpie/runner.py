"""Drives stages over a store: shard planning, resume, progress, bookkeeping.

Stages never touch files; the runner commits their output shard by shard, so killing a run loses
at most the shard in flight, and running the same command again continues from the last commit.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from magpie.errors import MagpieError
from magpie.stages.instructions import InstructionStage
from magpie.store import ShardStore


@dataclass
class RunSummary:
    """Counts of one stage run (this invocation plus what earlier ones committed)."""

    stage: str
    out: str
    rows: int = 0
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
            "attempts": self.attempts,
            "tokens": self.tokens,
            "shards": self.shards,
            "rejections": dict(sorted(self.rejections.items())),
            "complete": self.complete,
        }


class LiveProgress:
    """A rich progress bar of accepted rows with live attempts and tokens/s."""

    def __init__(self, total: int, label: str, console: Console, enabled: bool = True) -> None:
        self.console = console
        self.enabled = enabled
        self.started = time.monotonic()
        self.tokens = 0
        self.requests = 0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} rows"),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self._task = self._progress.add_task(label, total=total, speed="")

    def on_done(self, requests: int, tokens: int) -> None:
        self.requests += requests
        self.tokens += tokens
        self._refresh()

    def set_rows(self, rows: int, new_rows: int) -> None:
        self.new_rows = new_rows
        self._progress.update(self._task, completed=rows)
        self._refresh()

    def _refresh(self) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rows = getattr(self, "new_rows", 0)
        speed = (
            f"{rows / elapsed:.2f} rows/s · {self.tokens / elapsed:.0f} tok/s · "
            f"{self.requests} requests"
        )
        self._progress.update(self._task, speed=speed)

    @contextmanager
    def shown(self) -> Iterator[LiveProgress]:
        with self._progress:
            yield self


def plan_attempts(start: int, need: int, shard_size: int, budget: int, rate: float) -> range:
    """Attempt numbers of the next shard: enough for `need` rows at the acceptance `rate`."""
    wanted = math.ceil(need / max(rate, 0.05) * 1.1) + 1
    return range(start, min(start + min(shard_size, wanted), budget))


def run_source(
    stage: InstructionStage,
    store: ShardStore,
    num: int,
    shard_size: int,
    budget: int,
    progress: LiveProgress,
) -> RunSummary:
    """Fill `store` with `num` accepted rows, resuming after its committed shards."""
    summary = RunSummary(stage="instructions", out=str(store.root))
    next_attempt = 0
    for index in store.shard_indices():
        if index != summary.shards:
            raise MagpieError(
                f"{store.root} misses shard {summary.shards} before shard {index}: pass --overwrite"
            )
        info = store.shard_info(index)
        rows = store.read_shard(index)
        if rows is not None:
            stage.observe(rows)
        summary.shards += 1
        summary.rows += info["rows"]
        summary.tokens += info["tokens"]
        summary.attempts += info["attempts"][1] - info["attempts"][0]
        summary.rejections.update(info["rejections"])
        next_attempt = info["attempts"][1]
    summary.resumed_shards = summary.shards
    started = time.monotonic()
    progress.set_rows(summary.rows, 0)
    while summary.rows < num and next_attempt < budget:
        rate = summary.rows / summary.attempts if summary.attempts else 1.0
        attempts = plan_attempts(next_attempt, num - summary.rows, shard_size, budget, rate)
        out = stage.run(attempts, progress.on_done)
        rows = out.rows.slice(0, num - summary.rows)
        surplus = out.rows.num_rows - rows.num_rows
        info = {
            "shard": summary.shards,
            "attempts": [attempts.start, attempts.stop],
            "rows": rows.num_rows,
            "surplus": surplus,
            "tokens": out.tokens,
            "rejections": dict(out.rejections),
        }
        store.commit(summary.shards, rows, info, rejected=out.rejected)
        summary.shards += 1
        summary.rows += rows.num_rows
        summary.new_rows += rows.num_rows
        summary.attempts += len(attempts)
        summary.tokens += out.tokens
        summary.new_tokens += out.tokens
        summary.rejections.update(out.rejections)
        next_attempt = attempts.stop
        progress.set_rows(summary.rows, summary.new_rows)
    summary.seconds = time.monotonic() - started
    summary.complete = summary.rows >= num
    store.update_manifest(**summary.as_dict())
    return summary
