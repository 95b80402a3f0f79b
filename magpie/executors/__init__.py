"""Where stages run: `local` (this process) or `ray` (actors on a Ray cluster)."""

from magpie.executors.base import (
    ExecutorSpec,
    Job,
    ProgressView,
    RunSummary,
    StageProgress,
    create_executor,
)

__all__ = [
    "ExecutorSpec",
    "Job",
    "ProgressView",
    "RunSummary",
    "StageProgress",
    "create_executor",
]
