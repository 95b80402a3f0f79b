"""What every executor shares: the shard plan, resume, commits, the run summary and progress.

An executor runs a `Job`: a stage (built where it runs from its picklable spec) over the slices of
a plan, committing slice k as shard k through `ShardStore`. The driver alone commits shards and
writes the manifest, so a killed run loses at most the shards in flight, and rerunning it computes
only the shards that are missing (in any order: a shard's rows depend only on config and shard).
A source stage (instructions) also has a gate: its blocks are committed in order through it. A
block missing between committed ones (lost, or moved aside by `magpie verify --repair`) is redone
alone: the gate sees the blocks before it, accepts the redone block, then observes the committed
blocks after it again, which stay as they are (a block's rows depend only on config and block).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from magpie.errors import MagpieError
from magpie.stages.base import StageSpec, TransformOutput
from magpie.store import ShardStore


class ExecutorSpec(BaseModel):
    """Where stages run: `local` (this process) or `ray` (one actor per engine replica)."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["local", "ray"] = "local"
    address: str | None = Field(
        None, description="Ray cluster: auto, HOST:PORT or ray://HOST:PORT; None = start one here"
    )
    actors: int | None = Field(
        None, gt=0, description="engine replicas; None = as many as the cluster's CPUs/GPUs fit"
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor (fractions allowed)")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs per actor; None = vLLM's tensor_parallel_size, else 0"
    )
    max_in_flight: int = Field(2, gt=0, description="shards queued per actor")
    max_retries: int = Field(3, ge=0, description="restarts of a dead actor / retries of a shard")
    pool_shards: int = Field(
        4,
        gt=0,
        description="local: consecutive shards decoded in one engine call when the engine's "
        "results do not depend on the batch (committed one by one after it); 1 = one at a time",
    )


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
    commit_order: list[int] = field(default_factory=list)
    """Shards this invocation committed, in the order it committed them."""

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
            span = info["attempts"][1] - info["attempts"][0]
            self.attempts += info.get("attempts_run", span)
        if new:
            self.new_rows += info["rows"]
            self.new_tokens += info.get("tokens", 0)
            self.commit_order.append(info["shard"])
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


class Gate(Protocol):
    """Driver-side filter of a source stage's blocks, fed in block order."""

    @property
    def done(self) -> bool: ...

    def observe(self, rows: pa.Table | None) -> None: ...

    def accept(self, out: TransformOutput) -> tuple[TransformOutput, dict[str, Any]]: ...

    def remaining(self) -> tuple[int, set[str]]: ...


@dataclass
class Job:
    """One stage over one input, into one store.

    `source` is sliced into shards of `shard_size` rows (for instructions: a table of attempt
    numbers). `open_store(identity)` opens the output once the stage is built (the identity, e.g.
    the model id, is part of what the output records). `gate` is set for source stages.
    """

    spec: StageSpec
    source: pa.Table
    shard_size: int
    open_store: Callable[[dict[str, Any]], ShardStore]
    progress: StageProgress
    gate: Gate | None = None

    @property
    def num_shards(self) -> int:
        return math.ceil(self.source.num_rows / self.shard_size)

    def slice(self, index: int) -> pa.Table:
        return self.source.slice(index * self.shard_size, self.shard_size)


def attempt_blocks(budget: int) -> pa.Table:
    """The source table of instruction synthesis: attempt numbers 0 .. budget-1."""
    return pa.table({"attempt": pa.array(range(budget), pa.int64())})


def check_columns(job: Job, required: tuple[str, ...] | list[str]) -> None:
    """Refuse an input that lacks a column the stage reads, before any work."""
    missing = [c for c in required if c not in job.source.column_names]
    if missing:
        raise MagpieError(
            f"the {job.spec.name} stage needs column {missing[0]!r}, which its input lacks "
            f"(columns: {', '.join(job.source.column_names)}): run the stage that makes it first"
        )


class Driver:
    """The driver's side of a run: resume, commits in the right order, the manifest."""

    def __init__(self, job: Job, store: ShardStore) -> None:
        self.job = job
        self.store = store
        self.summary = RunSummary(stage=job.spec.name, out=str(store.root))
        self.started = time.monotonic()
        self._held: dict[int, TransformOutput] = {}
        self._next = 0  # next block a gate accepts
        self._later: set[int] = set()  # committed blocks after a missing one (gate only)
        committed = set(store.shard_indices())
        if job.gate is not None:
            self._resume_gate(committed)
        else:
            for index in sorted(committed):
                if index >= job.num_shards:
                    raise MagpieError(
                        f"{store.root} holds shard {index} beyond the {job.num_shards} shards "
                        "of this input: pass --overwrite to start again"
                    )
                self.summary.add_shard(store.shard_info(index), new=False)
        self.pending = [i for i in range(job.num_shards) if i not in committed]
        self._update_progress()

    def _resume_gate(self, committed: set[int]) -> None:
        if committed and self._cut_by_budget(max(committed), committed):
            committed.discard(max(committed))  # redone whole under the larger budget
        while self._next in committed:
            self._observe(self._next)
        # blocks committed after a missing one: observed again once the missing one is redone
        self._later = {i for i in committed if i > self._next}

    def _observe(self, index: int) -> None:
        """Feed the gate a block an earlier run committed, and count it."""
        assert self.job.gate is not None
        self.job.gate.observe(self.store.read_shard(index))
        self.summary.add_shard(self.store.shard_info(index), new=False)
        self._later.discard(index)
        self._next = index + 1

    def _cut_by_budget(self, index: int, committed: set[int]) -> bool:
        """Whether block `index` is the last one committed and an earlier, smaller attempt
        budget cut it short of the block this run plans (the budget was raised since)."""
        if index != max(committed) or index >= self.job.num_shards:
            return False
        span = self.store.shard_info(index).get("attempts")
        planned = self.job.slice(index).column("attempt")
        return bool(span) and span[1] < planned[-1].as_py() + 1

    @property
    def next_block(self) -> int:
        """The block a gate accepts next (the ones before it are committed and counted)."""
        return self._next

    @property
    def done(self) -> bool:
        """No more shards need running (a gate may stop a source early)."""
        gate = self.job.gate
        return gate.done if gate is not None else False

    def complete(self, index: int, out: TransformOutput) -> None:
        """A worker finished shard `index`: commit it (a gate commits blocks in order)."""
        if self.job.gate is None:
            self._commit(index, out, {"input_rows": self.job.slice(index).num_rows})
            return
        self._held[index] = out
        while not self.job.gate.done:
            if self._next in self._later:
                self._observe(self._next)
                continue
            if self._next not in self._held:
                break
            block = self._held.pop(self._next)
            accepted, extra = self.job.gate.accept(block)
            attempts = self.job.slice(self._next).column("attempt")
            span = [attempts[0].as_py(), attempts[-1].as_py() + 1]
            ran = {} if block.attempts_run is None else {"attempts_run": block.attempts_run}
            self._commit(self._next, accepted, {"attempts": span, **ran, **extra})
            self._next += 1
        if self.job.gate.done:
            self._held.clear()

    def _commit(self, index: int, out: TransformOutput, extra: dict[str, Any]) -> None:
        info = {
            "shard": index,
            "rows": out.rows.num_rows,
            "tokens": out.tokens,
            "rejections": dict(out.rejections),
            **extra,
        }
        self.store.commit(index, out.rows, info, rejected=out.rejected)
        self.summary.add_shard(info, new=True)
        self._update_progress()

    def _update_progress(self) -> None:
        units = self.summary.rows if self.job.gate is not None else self.summary.input_rows
        self.job.progress.set_completed(units)

    def finish(self) -> RunSummary:
        """Write the manifest (rebuilt from the shards' own bookkeeping) and return the summary."""
        summary = self.summary
        summary.seconds = time.monotonic() - self.started
        if self.job.gate is not None:
            summary.complete = self.job.gate.done
        else:
            summary.complete = summary.input_rows == self.job.source.num_rows
        self.store.update_manifest(**summary.as_dict())
        return summary


class Executor(Protocol):
    """Runs a job's uncommitted shards somewhere and commits them through its driver."""

    name: str

    def run(self, job: Job) -> RunSummary: ...

    def close(self) -> None: ...


def create_executor(spec: ExecutorSpec | None, engines: Any = None) -> Executor:
    """The executor a spec names (`engines`: a shared EnginePool for the local executor)."""
    spec = spec or ExecutorSpec()
    if spec.name == "ray":
        from magpie.executors.ray import RayExecutor

        return RayExecutor(spec)
    from magpie.executors.local import LocalExecutor

    return LocalExecutor(engines, pool_shards=spec.pool_shards)
