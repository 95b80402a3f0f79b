"""The Ray executor: one actor per engine replica, the driver commits every shard.

Each actor builds the stage (and its engine) from the picklable spec inside its own process. The
driver plans the same shards as the local executor, keeps at most `max_in_flight` shards queued
per actor, and commits results through `ShardStore` as they arrive (a source stage's blocks in
order, through its gate). An actor that dies is restarted and its shard retried (`max_restarts`,
`max_task_retries`); a `MagpieError` raised in an actor stops the run with its one line, and the
shards already committed stay. Actors write `D/.magpie/logs/<stage>-actor-<i>.log` (the engine's
own stderr included); the driver shows the one progress bar.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import pyarrow as pa

from magpie.engines.base import EnginePool
from magpie.errors import MagpieError
from magpie.executors.base import Driver, ExecutorSpec, Job, RunSummary, check_columns
from magpie.stages.base import NullProgress, StageSpec, TransformOutput

RAY_RANGE = ">=2.51,<2.61"


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise MagpieError(
            f"--executor ray needs Ray: pip install 'magpie-synth[ray]' (ray[data]{RAY_RANGE})"
        ) from exc
    return ray


class StageWorker:
    """Body of one actor: builds the stage on first use, runs shards, logs to its own file."""

    def __init__(self, spec: StageSpec, defaults: dict[str, dict[str, Any]], rank: int) -> None:
        self.spec = spec
        self.defaults = defaults
        self.rank = rank
        self.stage: Any = None
        self.identity: dict[str, Any] = {}
        self.log: logging.Logger | None = None

    def _build(self) -> None:
        if self.stage is None:
            self.stage, self.identity = self.spec(EnginePool(self.defaults))

    def prepare(self) -> tuple[dict[str, Any], tuple[str, ...]]:
        """Build the stage; its identity and the input columns it needs."""
        self._build()
        return self.identity, tuple(self.stage.required_columns)

    def _logger(self, log_dir: str) -> logging.Logger:
        if self.log is None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            path = Path(log_dir) / f"{self.spec.name}-actor-{self.rank}.log"
            handle = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the actor
            sys.stderr.flush()
            os.dup2(handle.fileno(), 2)  # the engine's native logging lands here too
            self.log = logging.getLogger(f"magpie.actor.{self.rank}")
            self.log.setLevel(logging.INFO)
            handler = logging.StreamHandler(handle)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            self.log.addHandler(handler)
            self.log.info("actor %d (pid %d) on %s", self.rank, os.getpid(), os.uname().nodename)
        return self.log

    def run(self, index: int, rows: pa.Table, log_dir: str) -> TransformOutput:
        """Shard `index` of the job: its slice in, the stage's output back to the driver."""
        log = self._logger(log_dir)
        self._build()
        started = time.monotonic()
        log.info("shard %d: %d input rows", index, rows.num_rows)
        try:
            out = self.stage(rows, NullProgress())
        except Exception as exc:
            log.info("shard %d failed: %s", index, exc)
            raise
        log.info(
            "shard %d: %d rows, %d tokens in %.1f s",
            index,
            out.rows.num_rows,
            out.tokens,
            time.monotonic() - started,
        )
        return out


def _engine_spec(job: Job) -> Any:
    return getattr(job.spec.config, "engine", None)


class RayExecutor:
    """Runs each stage on actors of a Ray cluster (started here when no address is given)."""

    name = "ray"

    def __init__(self, spec: ExecutorSpec) -> None:
        self.spec = spec
        self._started = False

    def _connect(self) -> Any:
        ray = import_ray()
        if not ray.is_initialized():
            try:
                ray.init(
                    address=self.spec.address,
                    log_to_driver=False,
                    include_dashboard=False,
                    configure_logging=False,
                )
            except ConnectionError as exc:
                raise MagpieError(
                    f"cannot reach the Ray cluster at {self.spec.address} ({exc}): start it with "
                    "`ray start --head` or pass the right --address"
                ) from None
            self._started = True
        return ray

    def _actor_count(self, ray: Any, gpus: float, shards: int) -> int:
        if self.spec.actors is not None:
            wanted = self.spec.actors
        else:
            resources = ray.cluster_resources()
            wanted = (
                int(resources.get("GPU", 0) // gpus)
                if gpus
                else int(resources.get("CPU", 1) // self.spec.num_cpus)
            )
        return max(1, min(wanted, shards))

    def _gpus(self, job: Job) -> float:
        if self.spec.num_gpus is not None:
            return self.spec.num_gpus
        engine = _engine_spec(job)
        if engine is not None and engine.name == "vllm":
            return float(engine.options.get("tensor_parallel_size", 1))
        return 0.0

    def run(self, job: Job) -> RunSummary:
        ray = self._connect()
        gpus = self._gpus(job)
        threads = max(1, int(self.spec.num_cpus))
        defaults = {"llamacpp": {"n_threads": threads}}
        retries = self.spec.max_retries
        remote = ray.remote(StageWorker).options(
            num_cpus=self.spec.num_cpus,
            num_gpus=gpus,
            max_restarts=retries,
            max_task_retries=retries,
        )
        count = self._actor_count(ray, gpus, max(job.num_shards, 1))
        actors = [remote.remote(job.spec, defaults, rank) for rank in range(count)]
        try:
            what = f"starting the {job.spec.name} stage on Ray"
            prepared = [self._get(ray, a.prepare.remote(), what) for a in actors]
            identity, required = prepared[0]
            check_columns(job, required)
            driver = Driver(job, job.open_store(identity))
            self._drive(ray, job, driver, actors)
            return driver.finish()
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)

    def _drive(self, ray: Any, job: Job, driver: Driver, actors: list[Any]) -> None:
        log_dir = str(driver.store.meta_dir / "logs")
        queue = deque(driver.pending)
        load = [0] * len(actors)
        in_flight: dict[Any, tuple[int, int]] = {}
        while not driver.done and (queue or in_flight):
            while queue and not driver.done and min(load) < self.spec.max_in_flight:
                rank = load.index(min(load))
                index = queue.popleft()
                ref = actors[rank].run.remote(index, job.slice(index), log_dir)
                in_flight[ref] = (index, rank)
                load[rank] += 1
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            index, rank = in_flight.pop(ref)
            load[rank] -= 1
            out = self._get(ray, ref, f"shard {index}", log_dir)
            job.progress.on_done(0, out.tokens)
            driver.complete(index, out)
        # a source that reached --num leaves later blocks in flight: run() kills their actors

    def _get(self, ray: Any, ref: Any, what: str, log_dir: str | None = None) -> Any:
        """A task's result; a worker's MagpieError becomes the run's one-line error."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, MagpieError):
                raise MagpieError(f"{what}: {cause}") from None
            raise
        except ray.exceptions.RayActorError as exc:
            where = f"see {log_dir}" if log_dir else "see the Ray logs"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MagpieError(
                f"{what}: a Ray worker died {self.spec.max_retries + 1} times ({first}); {where}. "
                "Committed shards are kept: rerun to resume"
            ) from None

    def close(self) -> None:
        if self._started:
            ray = import_ray()
            ray.shutdown()
            self._started = False
