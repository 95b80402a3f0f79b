"""The local executor: every shard in this process, in order, with live progress."""

from __future__ import annotations

from typing import Any

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

    def __init__(self, engines: EnginePool | None = None) -> None:
        self._owns = engines is None
        self.engines = engines if engines is not None else EnginePool()

    def run(self, job: Job) -> RunSummary:
        stage, identity = job.spec(self.engines)
        check_columns(job, stage.required_columns)
        driver = Driver(job, job.open_store(identity))
        progress: Any = _LiveProgress(job)
        aim = getattr(stage, "aim", None) if job.gate is not None else None
        for index in driver.pending:
            raise_pending()  # an interrupt a ctypes callback swallowed stops before the next shard
            if driver.done:
                break
            if aim is not None and driver.next_block == index:  # the gate takes it next
                aim(*job.gate.remaining())  # type: ignore[union-attr]
            driver.complete(index, stage(job.slice(index), progress))
        return driver.finish()

    def close(self) -> None:
        if self._owns:
            self.engines.close()
