"""Multi-GPU engine replicas on Ray: one placement group of one-GPU bundles per replica, the
actor in bundle 0 with its engine's own tasks captured into the group. Ray is started with
logical GPUs (no GPU is needed: Ray only counts them), and the fake engine stands in for vLLM."""

from __future__ import annotations

import io
import os

import pytest
import ray
from conftest import REPO
from rich.console import Console

from magpie import pipeline
from magpie.config import InstructionsConfig
from magpie.errors import MagpieError
from magpie.executors.base import ExecutorSpec, ProgressView, create_executor
from magpie.store import ShardStore


@pytest.fixture(scope="module")
def gpu_cluster():
    """A local Ray that believes it has 4 GPUs."""
    os.environ.setdefault("PYTHONPATH", str(REPO))
    ray.init(
        num_cpus=2,
        num_gpus=4,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield
    ray.shutdown()


def view() -> ProgressView:
    return ProgressView(Console(file=io.StringIO()), enabled=False)


def config() -> InstructionsConfig:
    return InstructionsConfig.model_validate(
        {"engine": {"name": "fake"}, "num": 8, "max_tokens": 9, "shard_size": 4}
    )


def test_each_replica_gets_its_own_placement_group_and_the_rows_of_a_local_run(
    gpu_cluster, tmp_path
):
    pipeline.instructions(config(), tmp_path / "local", view())
    executor = create_executor(ExecutorSpec(name="ray", num_gpus=2, num_cpus=0.5))
    try:
        summary, _ = pipeline.instructions(config(), tmp_path / "ray", view(), executor=executor)
        assert summary.complete
        assert len(executor._pool) == 2  # 4 GPUs / 2 per replica
        places = [ray.get(actor.where.remote()) for actor in executor._pool]
        groups = {g.id.hex(): g for g in executor._groups}
        assert sorted(p["placement_group"] for p in places) == sorted(groups)
        for group in executor._groups:
            assert group.bundle_specs[0] == {"GPU": 1.0, "CPU": 0.5}
            assert [b.get("GPU") for b in group.bundle_specs] == [1.0, 1.0]
        assert all(p["gpu_ids"] == [] for p in places)  # the GPUs are left to the engine's ranks
    finally:
        executor.close()
    table = ray.util.placement_group_table()
    assert all(entry["state"] == "REMOVED" for entry in table.values())
    local = ShardStore(tmp_path / "local").read_all().to_pylist()
    assert ShardStore(tmp_path / "ray").read_all().to_pylist() == local


def test_a_replica_larger_than_the_cluster_is_refused_with_one_line(
    gpu_cluster, tmp_path, monkeypatch
):
    monkeypatch.setattr("magpie.executors.ray.PLACEMENT_TIMEOUT_S", 2.0)
    executor = create_executor(ExecutorSpec(name="ray", num_gpus=8, actors=1, num_cpus=0.5))
    try:
        with pytest.raises(MagpieError, match="cannot place an engine replica of 8 GPUs"):
            pipeline.instructions(config(), tmp_path / "ray", view(), executor=executor)
    finally:
        executor.close()
    assert not (tmp_path / "ray").exists() or not list((tmp_path / "ray").glob("part-*"))


def test_fractional_gpus_above_one_are_refused(gpu_cluster, tmp_path):
    executor = create_executor(ExecutorSpec(name="ray", num_gpus=1.5, num_cpus=0.5))
    try:
        with pytest.raises(MagpieError, match="num_gpus 1.5"):
            pipeline.instructions(config(), tmp_path / "ray", view(), executor=executor)
    finally:
        executor.close()
