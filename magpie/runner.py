"""Former home of the runner, now `magpie.executors`; kept so existing imports keep working."""

from __future__ import annotations

from typing import Any

from magpie.executors.base import Job, ProgressView, RunSummary, StageProgress, attempt_blocks
from magpie.executors.local import LocalExecutor
from magpie.stages.base import StageSpec
from magpie.store import ShardStore

__all__ = ["ProgressView", "RunSummary", "StageProgress", "run_source"]


def _prebuilt(stage: Any, engines: Any) -> tuple[Any, dict[str, Any]]:
    return stage, {}


def run_source(
    stage: Any, store: ShardStore, num: int, shard_size: int, budget: int, progress: StageProgress
) -> RunSummary:
    """Run an already built instruction stage into an opened store, in this process."""
    from magpie.stages.instructions import InstructionGate

    job = Job(
        StageSpec("instructions", _prebuilt, stage),
        attempt_blocks(budget),
        shard_size,
        lambda _identity: store,
        progress,
        InstructionGate(num),
    )
    executor = LocalExecutor()
    try:
        return executor.run(job)
    finally:
        executor.close()
