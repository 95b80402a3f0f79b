"""The Ray executor: one actor per engine replica, the driver commits every shard.

Each actor builds the stage (and its engine) from the picklable spec inside its own process. The
driver plans the same shards as the local executor, keeps at most `max_in_flight` shards queued
per actor, and commits results through `ShardStore` as they arrive (a source stage's blocks in
order, through its gate). An actor that dies is restarted and its shard retried (`max_restarts`,
`max_task_retries`); a `MagpieError` raised in an actor stops the run with its one line, and the
shards already committed stay. Actors write `D/.magpie/logs/<stage>-actor-<i>.log` (the engine's
own stderr included); for an output in an object store, where a log cannot be appended to, they
write `$MAGPIE_CACHE_DIR/logs/<protocol>/<prefix>/` on their own machine instead. The driver
shows the one progress bar.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import pyarrow as pa

from magpie.cache import cache_root
from magpie.engines.base import EnginePool
from magpie.errors import MagpieError
from magpie.executors.base import Driver, ExecutorSpec, Job, RunSummary, check_columns
from magpie.fs import RemotePath
from magpie.stages.base import NullProgress, StageSpec, TransformOutput

RAY_RANGE = ">=2.51,<2.61"
PLACEMENT_TIMEOUT_S = 60.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise MagpieError(
            f"--executor ray needs Ray: pip install 'magpie-synth[ray]' (ray[data]{RAY_RANGE})"
        ) from exc
    return ray


class StageWorker:
    """Body of one actor: builds stages on first use (engines shared through its pool), runs
    shards, and logs to one file per stage beside the output."""

    def __init__(self, defaults: dict[str, dict[str, Any]], rank: int) -> None:
        self.engines = EnginePool(defaults)
        self.rank = rank
        self.stages: dict[bytes, tuple[Any, dict[str, Any]]] = {}
        self.log = logging.getLogger(f"magpie.actor.{rank}")
        self.log.setLevel(logging.INFO)
        self.log_path: Path | None = None

    def _stage(self, spec: StageSpec) -> tuple[Any, dict[str, Any]]:
        key = pickle.dumps(spec)
        if key not in self.stages:
            self.stages[key] = spec(self.engines)
        return self.stages[key]

    def prepare(self, spec: StageSpec) -> tuple[dict[str, Any], tuple[str, ...]]:
        """Build the stage; its identity and the input columns it needs."""
        stage, identity = self._stage(spec)
        return identity, tuple(stage.required_columns)

    def _log_to(self, path: Path) -> None:
        if path == self.log_path:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a", buffering=1)  # noqa: SIM115 - kept until the next stage's file
        sys.stderr.flush()
        os.dup2(handle.fileno(), 2)  # the engine's native logging lands here too
        for old in list(self.log.handlers):
            self.log.removeHandler(old)
            old.close()
        handler = logging.StreamHandler(handle)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        self.log.addHandler(handler)
        self.log_path = path
        self.log.info("actor %d on %s: %s", self.rank, os.uname().nodename, self.where())

    def where(self) -> dict[str, Any]:
        """Where this actor runs: pid, node, GPU ids and placement group (logs and tests)."""
        import ray

        context = ray.get_runtime_context()
        group = ray.util.get_current_placement_group()
        return {
            "pid": os.getpid(),
            "node": context.get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "placement_group": group.id.hex() if group is not None else None,
        }

    def run(self, spec: StageSpec, index: int, rows: pa.Table, log_dir: str) -> TransformOutput:
        """Shard `index` of a job: its slice in, the stage's output back to the driver."""
        self._log_to(Path(log_dir) / f"{spec.name}-actor-{self.rank}.log")
        stage, _ = self._stage(spec)
        started = time.monotonic()
        self.log.info("shard %d: %d input rows", index, rows.num_rows)
        try:
            out = stage(rows, NullProgress())
        except Exception as exc:
            self.log.info("shard %d failed: %s", index, exc)
            raise
        self.log.info(
            "shard %d: %d rows, %d tokens in %.1f s",
            index,
            out.rows.num_rows,
            out.tokens,
            time.monotonic() - started,
        )
        return out


def log_dir_of(meta_dir: Any) -> str:
    """Where actors log: beside the output, or in the local cache for an object store."""
    if isinstance(meta_dir, RemotePath):
        return str(cache_root() / "logs" / meta_dir.protocol / meta_dir.path)
    return str(meta_dir / "logs")


def _engine_spec(job: Job) -> Any:
    return getattr(job.spec.config, "engine", None)


class RayExecutor:
    """Runs each stage on actors of a Ray cluster (started here when no address is given)."""

    name = "ray"

    def __init__(self, spec: ExecutorSpec) -> None:
        self.spec = spec
        self._started = False
        self._pool: list[Any] = []
        self._groups: list[Any] = []  # placement groups of multi-GPU replicas
        self._group: tuple[float, str] | None = None

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

    def _actor_count(self, ray: Any, gpus: float) -> int:
        if self.spec.actors is not None:
            return self.spec.actors
        resources = ray.cluster_resources()
        if gpus:
            return max(1, int(resources.get("GPU", 0) // gpus))
        return max(1, int(resources.get("CPU", 1) // self.spec.num_cpus))

    def _gpus(self, ray: Any, job: Job) -> float:
        """GPUs of one engine replica: --num-gpus, else vLLM's tensor x pipeline parallel size
        (none on a cluster without GPUs, where vLLM runs its CPU build)."""
        gpus = self.spec.num_gpus
        engine = _engine_spec(job)
        vllm = gpus is None and engine is not None and engine.name == "vllm"
        if vllm and ray.cluster_resources().get("GPU", 0) > 0:
            options = engine.options
            gpus = float(
                int(options.get("tensor_parallel_size", 1))
                * int(options.get("pipeline_parallel_size", 1))
            )
        gpus = gpus or 0.0
        if gpus > 1 and not float(gpus).is_integer():
            raise MagpieError(
                f"num_gpus {gpus:g}: a replica of more than one GPU takes whole GPUs; use an "
                "integer (or a fraction below 1 to share a GPU)"
            )
        return gpus

    def _actors(self, ray: Any, job: Job) -> list[Any]:
        """The actors of this job: those of the previous job when they hold the same engine
        (a model is loaded once for instructions and responses), else a fresh set."""
        gpus = self._gpus(ray, job)
        engine = _engine_spec(job)
        group = (gpus, EnginePool.key(engine) if engine is not None else job.spec.name)
        if self._group == group:
            return self._pool
        self._release(ray)
        retries = self.spec.max_retries
        defaults: dict[str, dict[str, Any]] = {
            "llamacpp": {"n_threads": max(1, int(self.spec.num_cpus))}
        }
        count = self._actor_count(ray, gpus)
        if gpus > 1:  # a replica spans GPUs: vLLM's own Ray workers fill its placement group
            defaults["vllm"] = {"distributed_executor_backend": "ray"}
            self._groups = [self._placement_group(ray, int(gpus)) for _ in range(count)]
        remote = ray.remote(StageWorker)
        self._pool = [
            remote.options(
                max_restarts=retries, max_task_retries=retries, **self._placement(ray, gpus, rank)
            ).remote(defaults, rank)
            for rank in range(count)
        ]
        self._group = group
        return self._pool

    def _placement(self, ray: Any, gpus: float, rank: int) -> dict[str, Any]:
        """Resources of actor `rank`: its own CPUs/GPUs, or, for a multi-GPU replica, bundle 0
        of its placement group, with the engine's own Ray tasks captured into the group."""
        if not self._groups:
            return {"num_cpus": self.spec.num_cpus, "num_gpus": gpus}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self._groups[rank],
            placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True,
        )
        return {"num_cpus": self.spec.num_cpus, "num_gpus": 0, "scheduling_strategy": strategy}

    def _placement_group(self, ray: Any, gpus: int) -> Any:
        """One bundle per GPU rank of a replica (bundle 0 also holds the actor's CPUs), packed
        on one node when it fits; refused with one line when the cluster cannot hold it."""
        from ray.util.placement_group import placement_group

        bundles = [{"GPU": 1.0, "CPU": self.spec.num_cpus}] + [{"GPU": 1.0}] * (gpus - 1)
        group = placement_group(bundles, strategy="PACK")
        if not group.wait(PLACEMENT_TIMEOUT_S):
            ray.util.remove_placement_group(group)
            raise MagpieError(
                f"the Ray cluster cannot place an engine replica of {gpus} GPUs within "
                f"{PLACEMENT_TIMEOUT_S} s (it has {ray.cluster_resources().get('GPU', 0):g} "
                "GPUs): lower tensor_parallel_size or --actors, or add GPU nodes"
            )
        return group

    def _release(self, ray: Any) -> None:
        for actor in self._pool:
            ray.kill(actor, no_restart=True)
        for group in self._groups:
            ray.util.remove_placement_group(group)
        self._pool, self._groups, self._group = [], [], None

    def run(self, job: Job) -> RunSummary:
        ray = self._connect()
        actors = self._actors(ray, job)
        try:
            what = f"starting the {job.spec.name} stage on Ray"
            prepared = [self._get(ray, a.prepare.remote(job.spec), what) for a in actors]
            identity, required = prepared[0]
            check_columns(job, required)
            driver = Driver(job, job.open_store(identity))
            self._drive(ray, job, driver, actors)
        except BaseException:
            self._release(ray)  # a failed or interrupted stage leaves no actor behind
            raise
        return driver.finish()

    def _drive(self, ray: Any, job: Job, driver: Driver, actors: list[Any]) -> None:
        """Keep every actor fed until the job is done."""
        log_dir = log_dir_of(driver.store.meta_dir)
        queue = deque(driver.pending)
        load = [0] * len(actors)
        in_flight: dict[Any, tuple[int, int]] = {}
        while not driver.done and (queue or in_flight):
            while queue and not driver.done and min(load) < self.spec.max_in_flight:
                rank = load.index(min(load))
                index = queue.popleft()
                ref = actors[rank].run.remote(job.spec, index, job.slice(index), log_dir)
                in_flight[ref] = (index, rank)
                load[rank] += 1
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            index, rank = in_flight.pop(ref)
            load[rank] -= 1
            out = self._get(ray, ref, f"shard {index}", log_dir)
            job.progress.on_done(0, out.tokens)
            driver.complete(index, out)
        self._drain(ray, list(in_flight))

    @staticmethod
    def _drain(ray: Any, refs: list[Any]) -> None:
        """Blocks a source no longer needs (it reached --num): drop the queued ones and let the
        running ones end (at most one per actor), so the actors serve the next stage."""
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        for ref in refs:
            with contextlib.suppress(Exception):
                ray.get(ref)

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
        if self._pool:
            self._release(import_ray())
        if self._started:
            ray = import_ray()
            ray.shutdown()
            self._started = False
