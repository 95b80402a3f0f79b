"""The local executor: every shard in this process, in order, with live progress.

A stage whose engine gives a request the same results whatever it is decoded with (`poolable`)
gets up to `pool_shards` consecutive shards in one call: the engine keeps its batch full across
their boundaries instead of draining it at the end of every shard. Each shard is then committed
with the rows it would have had alone, so resume stays exact; a kill loses the pool in flight. An
aimed instruction block is told the next block (`prefetch`), whose first attempts its engine may
start in the slots its own tail leaves free.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from magpie.engines.base import EnginePool
from magpie.executors.base import Driver, Job, RunSummary, check_columns
from magpie.signals import raise_pending


class _LiveProgress:
    """Forwards a stage's progress to the bar; a gated source counts rows only at commit."""

    def __init__(self, job: Job) -> None:
        self._bar = job.progress
        self._units = job.gate is None

    def on_done(self, units: int, tokens: int) -> None:
        self._bar.on_done(units if self._units else 0, tokens)


class LocalExecutor:
    """Runs stages here; engines come from a pool that outlives one stage (shared by a recipe)."""

    name = "local"

    def __init__(self, engines: EnginePool | None = None, pool_shards: int = 1) -> None:
        self._owns = engines is None
        self.engines = engines if engines is not None else EnginePool()
        self.pool_shards = max(1, pool_shards)

    def run(self, job: Job) -> RunSummary:
        stage, identity = job.spec(self.engines)
        check_columns(job, stage.required_columns)
        driver = Driver(job, job.open_store(identity))
        progress: Any = _LiveProgress(job)
        aim = getattr(stage, "aim", None) if job.gate is not None else None
        prefetch = getattr(stage, "prefetch", None) if aim is not None else None
        pooled = job.gate is None and getattr(stage, "poolable", False)
        pools = list(_pools(driver.pending, self.pool_shards if pooled else 1))
        for number, indices in enumerate(pools):
            raise_pending()  # an interrupt a ctypes callback swallowed stops before the next shard
            if driver.done:
                break
            if len(indices) == 1:
                index = indices[0]
                if aim is not None and driver.next_block == index:  # the gate takes it next
                    aim(*job.gate.remaining())  # type: ignore[union-attr]
                    if prefetch is not None:  # the block after it may start in its tail
                        later = pools[number + 1][0] if number + 1 < len(pools) else None
                        prefetch(None if later is None else job.slice(later))
                driver.complete(index, stage(job.slice(index), progress))
                continue
            slices = [job.slice(index) for index in indices]
            rows = stage(pa.concat_tables(slices), progress).rows
            offset = 0
            for index, part in zip(indices, slices, strict=True):
                driver.complete(index, stage.account(rows.slice(offset, part.num_rows)))
                offset += part.num_rows
        return driver.finish()

    def close(self) -> None:
        if self._owns:
            self.engines.close()


def _pools(pending: list[int], size: int) -> Iterator[list[int]]:
    """Runs of at most `size` consecutive shard indices, in order."""
    run: list[int] = []
    for index in pending:
        if run and (len(run) == size or index != run[-1] + 1):
            yield run
            run = []
        run.append(index)
    if run:
        yield run
